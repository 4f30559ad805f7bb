"""The per-token arithmetic of the losses: masked reductions, KL estimators, loss aggregation, clipped
policy and value losses, advantage whitening.

Per-token tensors are ``[B, T]`` and aligned with a response mask; padding never enters a loss because
every reduction goes through ``masked_sum`` (which fills padding with 0, so even inf/NaN there is harmless).
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = x.masked_fill(~mask, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimators of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3).

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2; k3 = q/p - 1 - log(q/p)
    (unbiased and never negative; its log-ratio is clamped to +-20 so exp cannot overflow). With ``mask``,
    padding gets 0 and no gradient.
    """
    log_ratio = logp.float() - ref_logp.float()
    if mask is not None:
        log_ratio = log_ratio.masked_fill(~mask, 0.0)
    if kind == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: k1, k2, k3")


LOSS_AGGREGATIONS = ("microbatch_token_mean", "seq_mean", "token_mean")


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str, *, n_seqs: int | None = None,
              n_tokens: int | None = None, n_micro: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss ``x [b, T]`` (one micro-batch) to a scalar.

    - ``microbatch_token_mean`` (the paper's runs: OpenRLHF 0.6.3 with ``--packing_samples``): the mean
      over this micro-batch's tokens, divided by ``n_micro``, the minibatch's number of micro-batches, so
      the minibatch loss is the average of the micro-batches' token means;
    - ``seq_mean`` (OpenRLHF without packing): the mean over each sequence's tokens, then over the
      minibatch's ``n_seqs`` sequences;
    - ``token_mean``: one mean over the minibatch's ``n_tokens`` tokens.

    The ``n_*`` are the minibatch's totals (default: this micro-batch's), so the micro-batch losses add
    up to the minibatch loss exactly.
    """
    if how == "microbatch_token_mean":
        return masked_sum(x, mask) / mask.sum().clamp(min=1) / (n_micro if n_micro is not None else 1)
    if how == "seq_mean":
        per_seq = masked_sum(x, mask, dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / (n_seqs if n_seqs is not None else x.shape[0])
    if how == "token_mean":
        return masked_sum(x, mask) / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    raise ValueError(f"unknown loss aggregation {how!r}; allowed: {', '.join(LOSS_AGGREGATIONS)}")


def clipped_policy_loss(logp, old_logp, adv, mask, clip_eps: float, how: str, *, n_seqs=None, n_tokens=None,
                        n_micro=None):
    """PPO's clipped surrogate, aggregated by ``how``; padding (whatever it holds) gives neither loss nor gradient.

    Returns the loss and token-level sums for logging: clipped tokens, the k3 estimate of KL(old || new),
    and the mean |ratio - 1| of this batch.
    """
    old_logp = old_logp.masked_fill(~mask, 0.0)
    adv = adv.masked_fill(~mask, 0.0)
    log_ratio = (logp.float() - old_logp).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = aggregate(surrogate, mask, how, n_seqs=n_seqs, n_tokens=n_tokens, n_micro=n_micro)
    with torch.no_grad():
        stats = {"clipped": float(masked_sum(((ratio - 1).abs() > clip_eps).float(), mask)),
                 "approx_kl_sum": float(masked_sum(torch.expm1(log_ratio) - log_ratio, mask)),
                 "ratio_dev": float(masked_mean((ratio - 1).abs(), mask))}
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, clip: float, how: str, *, n_seqs=None, n_tokens=None,
                       n_micro=None):
    """0.5 * max((v - R)^2, (v_clipped - R)^2) with v_clipped within ``clip`` of the rollout's values."""
    values = values.float().masked_fill(~mask, 0.0)
    old_values = old_values.masked_fill(~mask, 0.0)
    returns = returns.masked_fill(~mask, 0.0)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns).square(), (v_clip - returns).square())
    return aggregate(loss, mask, how, n_seqs=n_seqs, n_tokens=n_tokens, n_micro=n_micro)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries, with the population variance clamped at ``eps`` (as
    OpenRLHF 0.6.3 whitens advantages); ``reduce`` sums across processes when distributed."""
    stats = torch.stack([masked_sum(x, mask), masked_sum(x.square(), mask), mask.sum().to(x.dtype)]).float()
    if reduce is not None:
        stats = reduce(stats)
    total, total_sq, n = stats.unbind()
    mean = total / n.clamp(min=1)
    var = total_sq / n.clamp(min=1) - mean.square()
    return ((x - mean) * torch.rsqrt(var.clamp(min=eps))).masked_fill(~mask, 0.0)
