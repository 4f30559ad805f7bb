"""What an RL job logs: the columns of ``steps.parquet`` and ``samples.parquet``, the per-step columns every
algorithm shares (``rollout_row``, ``format_stats``) and the atomic parquet writer."""

from __future__ import annotations

import numpy as np

from echochamber import formats as ec_formats

STEP_COLUMNS = [
    "step", "episode", "reward", "accuracy",
    *(f"share_{f}" for f in ec_formats.FORMATS), *(f"acc_{f}" for f in ec_formats.FORMATS),
    "kl_div", "entropy", "clip_frac", "approx_kl", "ratio_dev", "policy_loss", "value_loss", "value_mean",
    "grad_norm", "critic_grad_norm", "lr", "critic_lr",
    "response_len", "trunc_rate", "tokens_per_s", "zero_std_groups", "score_errors", "logprob_gap",
    "kept", "unique", "sft_loss", "rollout_s", "score_s", "train_s", "step_s",
]
SAMPLE_COLUMNS = ["step", "prompt", "completion", "format", "correct", "answer", "error", "gold",
                  "reward", "truncated"]


def write_table(rows: list[dict], columns: list[str], path) -> None:
    """Write rows as parquet atomically, with a stable column set (missing values are null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from echochamber.io import atomic_path

    data = {c: [r.get(c) for r in rows] for c in columns}
    table = pa.table({c: pa.array(v, type=_column_type(c, v)) for c, v in data.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _column_type(name: str, values: list):
    import pyarrow as pa
    if name in ("step", "episode", "kept", "unique"):
        return pa.int64()
    if name in ("prompt", "completion", "format", "answer", "error", "gold"):
        return pa.string()
    if name in ("correct", "truncated"):
        return pa.bool_()
    return pa.float64()


def format_stats(formats: list[str], correct: list[bool]) -> dict:
    """share_<format> and acc_<format> (None where a format is absent) for the three formats."""
    out = {}
    n = max(1, len(formats))
    for f in ec_formats.FORMATS:
        hits = [c for fmt, c in zip(formats, correct) if fmt == f]
        out[f"share_{f}"] = len(hits) / n
        out[f"acc_{f}"] = (sum(hits) / len(hits)) if hits else None
    return out


def rollout_row(recs: list[dict], infos: list[dict], train_s: float) -> dict:
    """The columns every algorithm logs for one rollout step: reward, formats, lengths, timings."""
    tokens = sum(i["tokens"] for i in infos)
    counted = [r["reward"] > 0 for r in recs]
    rollout_s = max(i["rollout_s"] for i in infos)
    return {
        "reward": float(np.mean([r["reward"] for r in recs])),
        "accuracy": float(np.mean(counted)),
        **format_stats([r["format"] for r in recs], counted),
        "response_len": tokens / max(1, len(recs)),
        "trunc_rate": float(np.mean([r["truncated"] for r in recs])),
        "score_errors": float(np.mean([r["error"] is not None for r in recs])),
        "rollout_s": rollout_s,
        "score_s": max(i["score_s"] for i in infos),
        "tokens_per_s": tokens / max(1e-9, rollout_s),
        "train_s": train_s,
    }
