"""The paper's seven findings (F1-F7 of PAPER.md), judged from the results store.

Each finding reads its saved query (``queries/finding_f<N>_*.sql``, over the ``rl_outcomes`` view) and
applies a criterion fixed here, written before any grid's results were looked at. A finding is
``reproduced``, ``not reproduced``, or ``not measurable`` when the grid lacks the cells it needs (the
verdict then names them). Numbers are means over seeds, with the standard deviation where there are
several seeds.

The criteria (also in the README):
- F1 collapse: in every PPO/GRPO cell at KL 0, one format holds >= 90% of the rollouts at a step within
  the first episode, and that step is within ``max(5, episode / 4)`` steps of the checkpoint that ends
  the largest pass@1 gain.
- F2 diversity: over the PPO/GRPO cells at KL 0, pass@1 and maj@k rise (mean change > 0) and pass@k ends
  below its peak over the run (mean drop > 0).
- F3 KL: for an algorithm run at two or more KL coefficients, the largest coefficient leaves the minority
  formats at least 5 points more share after RL than the smallest, and its pass@k change is no worse.
- F4 winner (needs two or more mixtures): in at least one RL cell, the winning format was not the
  majority before RL.
- F5 scale (needs two or more scales on one mixture): PPO at KL 0 converges to a code format at the
  smallest scale and to prose (``text``) at the largest.
- F6 algorithms (needs PPO, GRPO and EI at KL 0 on one model): GRPO collapses too (winner >= 90%), and
  Expert Iteration ends below PPO's pass@1 with a smaller shift of the winning format's share.
- F7 transfer (needs a benchmark besides the primary one): pass@1 there rises by at least 3 points on
  average over the RL cells.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from echochamber import store

REPRODUCED, NOT_REPRODUCED, NOT_MEASURABLE = "reproduced", "not reproduced", "not measurable"
COLLAPSE_SHARE = 0.9
KL_MINORITY_POINTS = 0.05
TRANSFER_POINTS = 0.03
# Stores built before the ingest recorded the grid's scales by size: known scales smallest first, others after
SCALE_LADDER = ("xs", "s", "m", "150M", "1B")


@dataclass
class Finding:
    id: str
    name: str
    verdict: str
    numbers: str

    def as_row(self) -> dict:
        return {"finding": self.id, "name": self.name, "verdict": self.verdict, "numbers": self.numbers}


def _rows(db, name: str) -> list[dict]:
    """The rows of a saved query, missing values (SQL NULL) as None."""
    df = store.fetch(db, store.resolve_sql(name))
    return df.astype(object).where(df.notna(), None).to_dict("records")


def spread(values) -> str:
    """``mean`` or ``mean ± sd (n seeds)`` of the non-missing values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.mean(xs):.3g} ± {statistics.stdev(xs):.2g} (n={len(xs)})"


def _mean(values) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return statistics.mean(xs) if xs else None


def _groups(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def f1(db) -> Finding:
    rows = _rows(db, "finding_f1_collapse")
    if not rows:
        return Finding("F1", "collapse", NOT_MEASURABLE, "needs PPO or GRPO cells at KL 0")

    def ok(r):
        c, end, g = r["collapse_step"], r["episode_end"], r["gain_step"]
        window = max(5, math.ceil((end or 0) / 4))
        return c is not None and end is not None and c <= end and g is not None and abs(c - g) <= window

    held = [ok(r) for r in rows]
    numbers = (f"{sum(held)}/{len(rows)} cells; collapse step {spread(r['collapse_step'] for r in rows)} "
               f"(first episode ends at {spread(r['episode_end'] for r in rows)}); largest pass@1 gain "
               f"{spread(r['gain'] for r in rows)} at step {spread(r['gain_step'] for r in rows)}; winners "
               f"{', '.join(sorted({str(r['winner']) for r in rows}))}")
    return Finding("F1", "collapse", REPRODUCED if all(held) else NOT_REPRODUCED, numbers)


def f2(db) -> Finding:
    rows = _rows(db, "finding_f2_diversity")
    if not rows:
        return Finding("F2", "diversity", NOT_MEASURABLE, "needs PPO or GRPO cells at KL 0")
    d_pass1 = [r["pass1_after"] - r["pass1_before"] for r in rows]
    d_maj = [r["maj_k_after"] - r["maj_k_before"] for r in rows]
    from_peak = [r["pass_k_from_peak"] for r in rows]
    held = _mean(d_pass1) > 0 and _mean(d_maj) > 0 and _mean(from_peak) < 0
    numbers = (f"pass@1 {spread(d_pass1)}, maj@k {spread(d_maj)} (change after RL); pass@k ends "
               f"{spread(from_peak)} from its peak ({len(rows)} cells)")
    return Finding("F2", "diversity", REPRODUCED if held else NOT_REPRODUCED, numbers)


def f3(db) -> Finding:
    rows = _rows(db, "finding_f3_kl")
    swept = {k: g for k, g in _groups(rows, ("mixture", "scale", "algo")).items() if len({r["kl"] for r in g}) >= 2}
    if not swept:
        return Finding("F3", "KL", NOT_MEASURABLE, "needs one algorithm (PPO or GRPO) at two or more KL values")
    verdicts, parts = [], []
    for (mixture, scale, algo), g in sorted(swept.items()):
        lo, hi = min(r["kl"] for r in g), max(r["kl"] for r in g)
        def at(kl, key, g=g):
            return [r[key] for r in g if r["kl"] == kl]

        more_minority = _mean(at(hi, "minority_after")) - _mean(at(lo, "minority_after"))
        pass_k_gap = _mean(at(hi, "pass_k_change")) - _mean(at(lo, "pass_k_change"))
        verdicts.append(more_minority >= KL_MINORITY_POINTS and pass_k_gap >= 0)
        parts.append(f"{algo} {mixture}/{scale}: minority share after RL {spread(at(lo, 'minority_after'))} at "
                     f"KL {lo:g} vs {spread(at(hi, 'minority_after'))} at KL {hi:g}; pass@k change "
                     f"{spread(at(lo, 'pass_k_change'))} vs {spread(at(hi, 'pass_k_change'))}")
    return Finding("F3", "KL", REPRODUCED if all(verdicts) else NOT_REPRODUCED, "; ".join(parts))


def f4(db) -> Finding:
    rows = _rows(db, "finding_f4_winner")
    if len({r["mixture"] for r in rows}) < 2:
        return Finding("F4", "winner", NOT_MEASURABLE,
                       "needs a repetition sweep: two or more mixtures (e.g. 1, 2, 4, 8 copies of one format)")
    upsets = [r for r in rows if r["winner"] != r["majority_before"]]
    failures = [r for r in upsets if (r["winner_acc_before"] or 0) < (r["majority_acc_before"] or 0)
                and r["pass1_change"] < 0]
    numbers = (f"{len(upsets)}/{len(rows)} cells won by a format that was not the majority before RL "
               f"(its share before: {spread(r['winner_share_before'] for r in upsets)}); {len(failures)} "
               f"won by a less accurate format with pass@1 falling")
    return Finding("F4", "winner", REPRODUCED if upsets else NOT_REPRODUCED, numbers)


def _scale_order(db) -> Callable[[str], tuple]:
    """Sort key of scale names, smallest first: the order the store recorded (by parameters), else the ladder."""
    ladder = store.meta(db).get("scales") or SCALE_LADDER
    return lambda name: (ladder.index(name), "") if name in ladder else (len(ladder), name)


def f5(db) -> Finding:
    rows = _rows(db, "finding_f5_scale")
    by_mixture = {m: g for (m,), g in _groups(rows, ("mixture",)).items() if len({r["scale"] for r in g}) >= 2}
    if not by_mixture:
        return Finding("F5", "scale", NOT_MEASURABLE, "needs PPO at KL 0 at two or more scales on one mixture")
    verdicts, parts, by_size = [], [], _scale_order(db)
    for mixture, g in sorted(by_mixture.items()):
        scales = sorted({r["scale"] for r in g}, key=by_size)
        winners = {z: sorted({r["winner"] for r in g if r["scale"] == z}) for z in scales}
        small, large = winners[scales[0]], winners[scales[-1]]
        verdicts.append("text" not in small and large == ["text"])
        parts.append(f"{mixture}: " + ", ".join(f"{z} -> {'/'.join(map(str, w))}" for z, w in winners.items()))
    return Finding("F5", "scale", REPRODUCED if all(verdicts) else NOT_REPRODUCED, "; ".join(parts))


def f6(db) -> Finding:
    rows = _rows(db, "finding_f6_algorithms")
    models = {k: {r["algo"]: r for r in g} for k, g in _groups(rows, ("mixture", "scale", "seed")).items()}
    complete = {k: a for k, a in models.items() if {"ppo", "grpo", "ei"} <= set(a)}
    if not complete:
        return Finding("F6", "algorithms", NOT_MEASURABLE, "needs PPO, GRPO and EI at KL 0 on the same model")
    grpo_collapses = [a["grpo"]["winner_share_after"] >= COLLAPSE_SHARE for a in complete.values()]
    ei_below = [a["ei"]["pass1_after"] < a["ppo"]["pass1_after"] for a in complete.values()]
    ei_milder = [a["ei"]["shift"] < a["ppo"]["shift"] for a in complete.values()]
    held = all(grpo_collapses) and _mean(ei_below) > 0.5 and _mean(ei_milder) > 0.5
    col = lambda algo, key: [a[algo][key] for a in complete.values()]   # noqa: E731
    numbers = (f"pass@1 after RL: PPO {spread(col('ppo', 'pass1_after'))}, GRPO {spread(col('grpo', 'pass1_after'))}, "
               f"EI {spread(col('ei', 'pass1_after'))}; winner's share shift: PPO {spread(col('ppo', 'shift'))}, "
               f"GRPO {spread(col('grpo', 'shift'))}, EI {spread(col('ei', 'shift'))}; GRPO winner share "
               f"{spread(col('grpo', 'winner_share_after'))}")
    return Finding("F6", "algorithms", REPRODUCED if held else NOT_REPRODUCED, numbers)


def f7(db) -> Finding:
    rows = _rows(db, "finding_f7_transfer")
    if not rows:
        return Finding("F7", "transfer", NOT_MEASURABLE, "needs a second benchmark (eval.benchmarks) besides the first")
    by_bench = _groups(rows, ("benchmark",))
    held = all(_mean(r["pass1_change"] for r in g) >= TRANSFER_POINTS for g in by_bench.values())
    numbers = "; ".join(f"{b}: pass@1 {spread(r['pass1_before'] for r in g)} -> {spread(r['pass1_after'] for r in g)} "
                        f"({len(g)} cells)" for (b,), g in sorted(by_bench.items()))
    return Finding("F7", "transfer", REPRODUCED if held else NOT_REPRODUCED, numbers)


FINDINGS = (f1, f2, f3, f4, f5, f6, f7)


def judge(db_path: str | os.PathLike) -> list[Finding]:
    """The seven findings of the store at ``db_path``, F1 first."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"no results store at {db_path}; run the workflow first (make run)")
    return [f(db_path) for f in FINDINGS]


def frame(findings: list[Finding]):
    """The findings as a DataFrame: finding, name, verdict, numbers."""
    import pandas as pd

    return pd.DataFrame([f.as_row() for f in findings])


def table(findings: list[Finding]) -> str:
    return store.format_frame(frame(findings), "table")


def write_tsv(findings: list[Finding], path: str | os.PathLike) -> None:
    """The findings table as a tab-separated file (the report rule's ``findings.tsv``), written atomically."""
    from echochamber.io import atomic_path

    with atomic_path(path) as tmp:
        frame(findings).to_csv(tmp, sep="\t", index=False)


def default_db(*config_files: str | os.PathLike) -> Path:
    """The store of the given configs, merged in order as Snakemake merges them (the last ``results`` wins);
    without any, the store of config.yaml in the working directory, else results/echo.duckdb."""
    if config_files:
        from echochamber import config

        return Path(config.load(*config_files).get("results") or "results") / "echo.duckdb"
    import yaml

    try:
        results = (yaml.safe_load(Path("config.yaml").read_text()) or {}).get("results") or "results"
    except (OSError, yaml.YAMLError):
        results = "results"
    return Path(results) / "echo.duckdb"
