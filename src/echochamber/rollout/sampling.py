"""What one sampling call asks for and returns, and the token draw itself.

``SamplingParams``: temperature, then top-k (off when 0), then top-p (the smallest set of most likely
tokens whose probability reaches ``top_p``), then an exact inverse-CDF draw (``sample_tokens``) with an
optional ``torch.Generator`` on the model's device. ``RolloutBatch``: what every backend returns;
``logprobs`` are always under the model at temperature 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class RolloutBatch:
    prompt_ids: torch.LongTensor  # [B, P] left-padded with pad_id
    prompt_mask: torch.BoolTensor  # [B, P]
    response_ids: torch.LongTensor  # [B, T] right-padded with pad_id (T = longest response)
    response_mask: torch.BoolTensor  # [B, T] True for generated tokens up to and including EOS
    logprobs: torch.FloatTensor  # [B, T] log-prob of each sampled token at temperature 1 (0 where masked)
    truncated: torch.BoolTensor  # [B] True when the response hit max_new_tokens without EOS

    def sequences(self) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Prompt + response ids and their attention mask, for a training forward pass."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask


# ---------------------------------------------------------------------------------------------- sampling


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k (if ``top_k`` > 0) and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose total probability is >= ``top_p``: a token
    stays when the probability of the tokens ranked above it is still below ``top_p``, so the most
    likely token always stays.
    """
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        nucleus = _top_p_within(scores, top_p, _NUCLEUS_CANDIDATES)
        if nucleus is not None:
            return nucleus
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass of the tokens ranked above
        scores = scores.masked_fill(torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted), -math.inf)
    return scores


# A trained model's nucleus at top_p 0.95 is a few tokens: rank only this many first (a partial sort),
# and sort the whole vocabulary only when some row's nucleus reaches beyond them.
_NUCLEUS_CANDIDATES = 64


def _top_p_within(scores: torch.Tensor, top_p: float, k: int) -> torch.Tensor | None:
    """The top-p filter of ``scores`` when every row's nucleus lies within its ``k`` most likely tokens,
    else None. Tokens ranked below ``k`` are then dropped: the mass above them is at least ``top_p``."""
    if k >= scores.shape[-1]:
        return None
    values, order = scores.topk(k, dim=-1)  # sorted, descending
    probs = (values - scores.logsumexp(dim=-1, keepdim=True)).exp()
    mass = probs.cumsum(dim=-1)
    if not bool((mass[:, -1] >= top_p).all()):
        return None
    above = mass - probs  # mass of the tokens ranked above each candidate
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, above < top_p)
    return scores.masked_fill(~keep, -math.inf)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """One token per row of ``logits`` [n, vocab] (fp32) under ``params``."""
    if params.greedy or params.top_k == 1:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    probs = filter_logits(scores, params.top_k, params.top_p).softmax(dim=-1)
    # inverse-CDF draw, one uniform per row; in float64 u * total < total, so the token found has p > 0
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]

