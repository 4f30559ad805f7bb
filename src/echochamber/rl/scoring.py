"""Rewards: the reward's verdict on each completion (``score``, never a crash) and the task reward."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from echochamber import formats as ec_formats

log = logging.getLogger("echochamber.rl")


@dataclass
class Scored:
    """One completion's verdict as the RL loop records it."""
    correct: bool
    format: str
    answer: str | None
    error: str | None


def default_scorer():
    try:
        from echochamber.reward import score_batch
    except ModuleNotFoundError as e:
        if e.name != "echochamber.reward":
            raise
        raise RuntimeError("echochamber.reward is not installed: RL needs its score_batch to reward answers") from None
    return score_batch


def _as_scored(verdict, completion: str) -> Scored:
    fmt = getattr(verdict, "format", None)
    return Scored(correct=bool(getattr(verdict, "correct", False)),
                  format=fmt if fmt in ec_formats.FORMATS else ec_formats.classify(completion),
                  answer=None if getattr(verdict, "answer", None) is None else str(verdict.answer),
                  error=getattr(verdict, "error", None))


def score(completions: list[str], golds: list[str], scorer=None) -> list[Scored]:
    """Verdicts for completions; a scorer failure on one completion gives it reward 0 and an error, never a crash."""
    scorer = scorer or default_scorer()
    try:
        verdicts = list(scorer(completions, golds))
        if len(verdicts) != len(completions):
            raise RuntimeError(f"scorer returned {len(verdicts)} verdicts for {len(completions)} completions")
    except Exception as e:  # noqa: BLE001 - the run must go on; score one by one to isolate the culprit
        log.warning("batch scoring failed (%s: %s); scoring completions one by one", type(e).__name__, e)
        verdicts = []
        for c, g in zip(completions, golds):
            try:
                verdicts.append(scorer([c], [g])[0])
            except Exception as e1:  # noqa: BLE001
                verdicts.append(Scored(False, ec_formats.classify(c), None, f"scorer error: {type(e1).__name__}: {e1}"))
    return [_as_scored(v, c) for v, c in zip(verdicts, completions)]


def task_rewards(scored: list[Scored], truncated: torch.Tensor, policy: str, clip=None) -> torch.Tensor:
    """1 for a correct answer, else 0; a response cut at the length limit gets 0 under ``zero_reward``."""
    r = torch.tensor([float(s.correct) for s in scored])
    if policy == "zero_reward":
        r = r.masked_fill(truncated.cpu().bool(), 0.0)
    elif policy != "score":
        raise ValueError(f"unknown truncation policy {policy!r}; allowed: score, zero_reward")
    if clip is not None:
        r = r.clamp(clip[0], clip[1])
    return r
