"""PPO: a critic from the policy's checkpoint, k1 KL per token in the reward, GAE, clipped value loss.

The task reward (1 if correct) is added at each response's last token; every token also gets
``-kl * k1(policy, reference)``. Advantages come from GAE (gamma 1, lambda 0.95 in the paper) over the
critic's values and are whitened over the rollout batch (across processes when distributed).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from echochamber.rl.experience import Experience, last_token_index
from echochamber.rl.losses import kl_estimate, whiten
from echochamber.rl.trainer import PolicyGradientTrainer
from echochamber.tensors import model_inputs


class Critic(nn.Module):
    """The policy's trunk (a copy, trained separately) with a small-initialised, bias-free scalar value head
    (OpenRLHF 0.6.3's ``value_head``)."""

    def __init__(self, policy, *, init_std: float | None = None):
        super().__init__()
        self.trunk = copy.deepcopy(policy.model)
        d = policy.config.hidden_size
        self.head = nn.Linear(d, 1, bias=False)
        nn.init.normal_(self.head.weight, std=init_std if init_std is not None else 1.0 / (d + 1))
        self.to(next(policy.parameters()).dtype)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """Values ``[b, T]``: the value of the state before each response token."""
        ids, mask, pos = model_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        p, t = prompt_ids.shape[1], response_ids.shape[1]
        hidden = self.trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return self.head(hidden[:, p - 1:p + t - 1]).squeeze(-1)


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl_coef: float, logp=None, ref_logp=None,
                  estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards ``[B, T]``: ``-kl_coef * KL`` on every token, plus the task reward on the last one."""
    r = torch.zeros(mask.shape, dtype=torch.float, device=mask.device)
    if kl_coef and ref_logp is not None:
        r = r - kl_coef * kl_estimate(logp, ref_logp, estimator, mask)
    r = r.masked_fill(~mask, 0.0)
    last = last_token_index(mask)
    r[torch.arange(len(r), device=r.device), last] += rewards.float() * mask.any(1)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns)."""
    rewards = rewards.masked_fill(~mask, 0.0)
    values = values.float().masked_fill(~mask, 0.0)
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    t_max = rewards.shape[1]
    for t in reversed(range(t_max)):
        next_value = values[:, t + 1] if t + 1 < t_max else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding carries nothing back
        adv[:, t] = running
    returns = (adv + values).masked_fill(~mask, 0.0)
    return adv.masked_fill(~mask, 0.0), returns


class PPOTrainer(PolicyGradientTrainer):

    def advantages(self, exp: Experience) -> tuple[Experience, dict]:
        s, mask = self.s, exp.response_mask
        r = token_rewards(exp.rewards, mask, s.kl_coef, exp.old_logprobs, exp.ref_logprobs, s.ppo.kl_estimator)
        adv, ret = gae(r, exp.values, mask, s.gamma, s.lam)
        if s.ppo.whiten_advantages:
            adv = whiten(adv, mask, reduce=self.accel.sum)
        exp.advantages, exp.returns = adv, ret
        return exp, {}
