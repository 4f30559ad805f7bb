"""The learning-rate schedule of pretraining and RL (no torch import: the workflow imports pretrain cheaply)."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float, floor_after_last: bool = False,
              decay: int | None = None) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index ``step`` of ``total`` (a LambdaLR
    factor): linear warm-up ``(step + 1) / warmup`` over the first ``warmup`` steps, then a cosine from 1 at
    step ``warmup`` down to exactly ``min_ratio`` at the last step, ``total - 1``, and ``min_ratio`` after it.

    ``floor_after_last`` is RL's convention, that of the paper's OpenRLHF (transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup``): the cosine spans one step more and reaches the floor at
    step ``total``, which never runs. (transformers also starts the warm-up at lr 0; both conventions here
    train at ``lr / warmup`` on the first step.)

    ``decay`` (warm-up, stable, decay): the factor holds at 1 after the warm-up and the cosine spans only
    the last ``decay`` steps, ``total - decay`` to ``total - 1``."""
    if step < warmup:
        return (step + 1) / warmup
    start = warmup if decay is None else max(warmup, total - decay)
    span = total - start - (0 if floor_after_last else 1)
    progress = min(1.0, max(0, step - start) / max(1, span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
