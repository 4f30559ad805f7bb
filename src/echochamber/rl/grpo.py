"""GRPO: no critic; the samples of one prompt form a group and share its normalised reward as advantage.

Advantage of sample i of a group: (r_i - mean_group) / (std_group + eps), the same for all its tokens.
The KL to the reference is a loss term (k3 by default), not part of the reward. Groups whose rewards have
no spread (all right or all wrong) give zero advantage; their share is logged as ``zero_std_groups``.
"""

from __future__ import annotations

import torch

from echochamber.rl.experience import Experience
from echochamber.rl.losses import aggregate, kl_estimate
from echochamber.rl.trainer import PolicyGradientTrainer


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample advantages for rewards laid out group after group; also which groups have zero spread."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = (r - mean) / (std + eps)
    return adv.reshape(-1), (r.max(1).values == r.min(1).values)


class GRPOTrainer(PolicyGradientTrainer):
    def advantages(self, exp: Experience) -> tuple[Experience, dict]:
        adv, flat = group_advantages(exp.rewards, self.s.samples_per_prompt, self.s.grpo.std_eps)
        exp.advantages = adv[:, None].expand_as(exp.response_ids).masked_fill(~exp.response_mask, 0.0).contiguous()
        return exp, {"zero_std_groups": float(flat.float().mean())}

    def extra_loss(self, mb: Experience, logp, counts: dict):
        if not self.s.kl_coef or mb.ref_logprobs is None:
            return None
        kl = kl_estimate(logp, mb.ref_logprobs, self.s.grpo.kl_estimator, mb.response_mask)
        return self.s.kl_coef * aggregate(kl, mb.response_mask, self.s.loss_agg, **counts)
