"""A rollout batch and what the updates need of it: ``Experience``, minibatches and micro-batches, the
no-grad annotation pass (old / reference log-probs, values, entropy).

Layout of a rollout batch: prompts left-padded ``[B, P]``, responses right-padded ``[B, T]``; the model
reads ``prompt + response`` with position ids counted from each prompt's first real token, and the
hidden state at position ``P - 1 + t`` predicts response token ``t``. Every per-token tensor of an
``Experience`` is ``[B, T]`` and aligned with ``response_mask``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from echochamber.rl.losses import masked_sum
from echochamber.tensors import model_inputs, token_logprobs


@dataclass
class Experience:
    """One rollout batch with everything the updates need; per-token tensors are ``[B, T]``."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor | None = None        # [B] task reward (after clipping / truncation policy)
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    group: torch.Tensor | None = None          # [B] prompt index of each sample

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: torch.Tensor, trim: bool = True) -> Experience:
        """Rows ``idx``, with all-padding prompt columns (left) and response columns (right) cut off."""
        pm, rm = self.prompt_mask[idx], self.response_mask[idx]
        p0 = int((~pm.any(0)).long().cumprod(0).sum()) if trim else 0
        p0 = min(p0, pm.shape[1] - 1)  # keep at least one prompt column: it predicts response token 0
        t1 = int(rm.any(0).nonzero().max()) + 1 if trim and rm.any() else rm.shape[1]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name.startswith("prompt_"):
                out[f.name] = v[idx][:, p0:]
            elif v.dim() == 2:
                out[f.name] = v[idx][:, :t1]
            else:
                out[f.name] = v[idx]
        return Experience(**out)

    def to(self, device) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def micro_batches(exp: Experience, idx: torch.Tensor, size: int, *, in_order: bool = False) -> list[torch.Tensor]:
    """Rows ``idx`` in chunks of ``size``, longest first.

    By default the rows are sorted by length before chunking, so that each chunk carries little padding.
    ``in_order`` keeps consecutive rows of ``idx`` together and sorts only within each chunk: OpenRLHF packs
    its shuffled buffer that way, and a reduction per micro-batch (``microbatch_token_mean``) depends on
    which rows share one.
    """
    lengths = (exp.prompt_mask.sum(1) + exp.response_mask.sum(1)).cpu()

    def longest_first(rows: torch.Tensor) -> torch.Tensor:
        return rows[torch.argsort(lengths[rows.cpu()], descending=True, stable=True).to(rows.device)]

    if not in_order:
        idx = longest_first(idx)
    return [longest_first(idx[i:i + size]) for i in range(0, len(idx), size)]


def policy_logits(model, exp: Experience) -> torch.Tensor:
    """Logits ``[b, T, vocab]`` predicting each response token (only those positions go through the head)."""
    ids, mask, pos = model_inputs(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask)
    t = exp.response_ids.shape[1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=t + 1, use_cache=False)
    return out.logits[:, :-1]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = (logits.float() if temperature == 1 else logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def annotate(exp: Experience, policy, *, ref=None, critic=None, micro_batch_size: int = 16,
             autocast=contextlib.nullcontext, temperature: float = 1.0,
             sampled_logprobs: torch.Tensor | None = None) -> tuple[Experience, float | None]:
    """One no-grad pass per model over the rollout: old log-probs and entropy (at the sampling
    ``temperature``), reference log-probs (same temperature), values.

    Also returns the summed |difference| between ``sampled_logprobs`` (the rollout engine's, at
    temperature 1) and this pass's temperature-1 log-probs: a check that sampling and training see the
    same model (None without ``sampled_logprobs``).
    """
    n, width = len(exp), exp.response_ids.shape[1]
    old, ent = torch.zeros(n, width), torch.zeros(n, width)
    raw = torch.zeros(n, width) if sampled_logprobs is not None else None
    ref_lp = torch.zeros(n, width) if ref is not None else None
    values = torch.zeros(n, width) if critic is not None else None
    for idx in micro_batches(exp, torch.arange(n), micro_batch_size):
        idx = idx.cpu()
        mb = exp.select(idx)
        with autocast():
            logits = policy_logits(policy, mb)
            old[idx, :logits.shape[1]] = token_logprobs(logits, mb.response_ids, temperature).cpu()
            ent[idx, :logits.shape[1]] = token_entropy(logits, temperature).cpu()
            if raw is not None:     # at temperature 1 the old log-probs are the raw ones: no second pass
                raw[idx, :logits.shape[1]] = (old[idx, :logits.shape[1]] if temperature == 1 else
                                              token_logprobs(logits, mb.response_ids).cpu())
            del logits
            if ref is not None:
                logits = policy_logits(ref, mb)
                ref_lp[idx, :logits.shape[1]] = token_logprobs(logits, mb.response_ids, temperature).cpu()
                del logits
            if critic is not None:
                v = critic(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
                values[idx, :v.shape[1]] = v.float().cpu()
    dev = exp.response_ids.device
    mask = exp.response_mask.cpu()

    def put(x):
        return None if x is None else x.masked_fill(~mask, 0.0).to(dev)

    gap = None if raw is None else float(masked_sum((sampled_logprobs.cpu().float() - raw).abs(), mask))
    return replace(exp, old_logprobs=put(old), entropy=put(ent), ref_logprobs=put(ref_lp), values=put(values)), gap


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real response token (0 for an empty row)."""
    return (mask.long().sum(1) - 1).clamp(min=0)


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Shuffle ``n`` rows one by one into minibatches of ``size``, as OpenRLHF's replay buffer is shuffled (a
    GRPO prompt's samples land in different minibatches)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]
