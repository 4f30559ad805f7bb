"""The paper's seven findings (F1-F7 of docs/paper.md), judged from the results store.

Each finding reads its saved query (``queries/finding_f<N>_*.sql``, over the ``rl_outcomes`` view) and
applies a criterion fixed here, written before any grid's results were looked at. The criterion is judged
in each seed (the cells' ``seed``: one independent replicate of the grid) that has the cells it needs, and
one rule (:func:`verdict`) makes the verdict: a finding is ``reproduced`` when its criterion holds in at
least ceil(7/8 x n) of the n seeds that have its cells (7 of 8, 3 of 3, 2 of 2, 1 of 1), ``not reproduced``
otherwise, and ``not measurable`` when no seed has them (the verdict then names the cells it needs). The
numbers start with that count and the seeds where the criterion failed (``6/8 seeds (seed 3: ...; seed 5:
...)``), then means over all the cells, with the standard deviation where there are several seeds.

The criteria, in each seed (also in docs/results.md):
- F1 collapse: in every PPO/GRPO cell at KL 0, one format holds >= 90% of the rollouts at a step within
  the first episode, and that step is within ``max(5, episode / 4)`` steps of the checkpoint that ends
  the largest pass@1 gain.
- F2 diversity: over the PPO/GRPO cells at KL 0, pass@1 and maj@k rise (mean change > 0) and pass@k ends
  below its peak over the run (mean drop > 0).
- F3 KL: for every algorithm run at two or more KL coefficients on one model, the largest coefficient
  leaves the minority formats at least 5 points more share after RL than the smallest, and its pass@k
  change is no worse.
- F4 winner (needs two or more mixtures): in at least one RL cell, the winning format was not the
  majority before RL.
- F5 scale (needs two or more scales on one mixture): on every such mixture, PPO at KL 0 converges to a
  code format at the smallest scale and to prose (``text``) at the largest.
- F6 algorithms (needs PPO, GRPO and EI at KL 0 on one model): on every such model GRPO collapses too
  (winner >= 90%), and Expert Iteration ends below PPO's pass@1 with a smaller shift of the winning
  format's share.
- F7 transfer (needs a benchmark besides the primary one): pass@1 there rises by at least 3 points on
  average over the RL cells, on every such benchmark.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from echochamber import store

REPRODUCED, NOT_REPRODUCED, NOT_MEASURABLE = "reproduced", "not reproduced", "not measurable"
SEEDS_NEEDED = Fraction(7, 8)   # the share of seeds (rounded up) in which a criterion must hold
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


def verdict(held: list[bool]) -> str:
    """The one verdict rule, over a criterion judged in each seed that has its cells (one bool per seed)."""
    if not held:
        return NOT_MEASURABLE
    return REPRODUCED if sum(held) >= math.ceil(SEEDS_NEEDED * len(held)) else NOT_REPRODUCED


def _over_seeds(fid: str, name: str, seeds: dict[int, tuple[bool, str]], numbers: str, needs: str) -> Finding:
    """The finding of a criterion judged per seed (seed -> whether it held, and what was seen there)."""
    judged = verdict([held for held, _ in seeds.values()])
    if judged == NOT_MEASURABLE:
        return Finding(fid, name, judged, needs)
    failed = [f"seed {s}: {seen}" for s, (held, seen) in sorted(seeds.items()) if not held]
    count = f"{len(seeds) - len(failed)}/{len(seeds)} seeds" + (f" ({'; '.join(failed)})" if failed else "")
    return Finding(fid, name, judged, f"{count}; {numbers}")


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


def _by_seed(rows) -> dict[int, list[dict]]:
    return {s: g for (s,), g in _groups(rows, ("seed",)).items()}


def f1(db) -> Finding:
    rows = _rows(db, "finding_f1_collapse")

    def ok(r):
        c, end, g = r["collapse_step"], r["episode_end"], r["gain_step"]
        window = max(5, math.ceil((end or 0) / 4))
        return c is not None and end is not None and c <= end and g is not None and abs(c - g) <= window

    def in_seed(g):
        n = sum(map(ok, g))
        return n == len(g), f"{n}/{len(g)} cells collapse in time"

    numbers = (f"{sum(map(ok, rows))}/{len(rows)} cells; collapse step {spread(r['collapse_step'] for r in rows)} "
               f"(first episode ends at {spread(r['episode_end'] for r in rows)}); largest pass@1 gain "
               f"{spread(r['gain'] for r in rows)} at step {spread(r['gain_step'] for r in rows)}; winners "
               f"{', '.join(sorted({str(r['winner']) for r in rows}))}")
    return _over_seeds("F1", "collapse", {s: in_seed(g) for s, g in _by_seed(rows).items()}, numbers,
                       "needs PPO or GRPO cells at KL 0")


def f2(db) -> Finding:
    rows = _rows(db, "finding_f2_diversity")

    def changes(g):
        return ([r["pass1_after"] - r["pass1_before"] for r in g], [r["maj_k_after"] - r["maj_k_before"] for r in g],
                [r["pass_k_from_peak"] for r in g])

    def in_seed(g):
        d_pass1, d_maj, from_peak = (_mean(x) for x in changes(g))
        return (d_pass1 > 0 and d_maj > 0 and from_peak < 0,
                f"pass@1 {d_pass1:+.3g}, maj@k {d_maj:+.3g}, pass@k {from_peak:+.3g} from its peak")

    d_pass1, d_maj, from_peak = changes(rows)
    numbers = (f"pass@1 {spread(d_pass1)}, maj@k {spread(d_maj)} (change after RL); pass@k ends "
               f"{spread(from_peak)} from its peak ({len(rows)} cells)")
    return _over_seeds("F2", "diversity", {s: in_seed(g) for s, g in _by_seed(rows).items()}, numbers,
                       "needs PPO or GRPO cells at KL 0")


def _kl_swept(rows) -> dict[tuple, list[dict]]:
    """(mixture, scale, algo) -> its cells, where the algorithm ran at two or more KL values."""
    return {k: g for k, g in _groups(rows, ("mixture", "scale", "algo")).items() if len({r["kl"] for r in g}) >= 2}


def _kl_contrast(g) -> tuple[float, float, float, float]:
    """The smallest and largest KL of cells ``g``, and how much more minority share after RL and pass@k
    change the largest leaves (means over the cells at each)."""
    lo, hi = min(r["kl"] for r in g), max(r["kl"] for r in g)

    def gap(key):
        return _mean(r[key] for r in g if r["kl"] == hi) - _mean(r[key] for r in g if r["kl"] == lo)

    return lo, hi, gap("minority_after"), gap("pass_k_change")


def f3(db) -> Finding:
    rows = _rows(db, "finding_f3_kl")

    def in_seed(swept):
        failed = []
        for (mixture, scale, algo), g in sorted(swept.items()):
            lo, hi, more_minority, pass_k_gap = _kl_contrast(g)
            if not (more_minority >= KL_MINORITY_POINTS and pass_k_gap >= 0):
                failed.append(f"{algo} {mixture}/{scale} at KL {hi:g} vs {lo:g}: minority share "
                              f"{more_minority:+.2g}, pass@k change {pass_k_gap:+.2g}")
        return not failed, ", ".join(failed)

    parts = []
    for (mixture, scale, algo), g in sorted(_kl_swept(rows).items()):
        lo, hi = min(r["kl"] for r in g), max(r["kl"] for r in g)

        def at(kl, key, g=g):
            return [r[key] for r in g if r["kl"] == kl]

        parts.append(f"{algo} {mixture}/{scale}: minority share after RL {spread(at(lo, 'minority_after'))} at "
                     f"KL {lo:g} vs {spread(at(hi, 'minority_after'))} at KL {hi:g}; pass@k change "
                     f"{spread(at(lo, 'pass_k_change'))} vs {spread(at(hi, 'pass_k_change'))}")
    seeds = {s: in_seed(swept) for s, g in _by_seed(rows).items() if (swept := _kl_swept(g))}
    return _over_seeds("F3", "KL", seeds, "; ".join(parts),
                       "needs one algorithm (PPO or GRPO) at two or more KL values in one seed")


def f4(db) -> Finding:
    judged = {s: g for s, g in _by_seed(_rows(db, "finding_f4_winner")).items()
              if len({r["mixture"] for r in g}) >= 2}
    rows = [r for g in judged.values() for r in g]
    upsets = [r for r in rows if r["winner"] != r["majority_before"]]
    failures = [r for r in upsets if (r["winner_acc_before"] or 0) < (r["majority_acc_before"] or 0)
                and r["pass1_change"] < 0]
    seeds = {s: (any(r["winner"] != r["majority_before"] for r in g), f"no upset in {len(g)} cells")
             for s, g in judged.items()}
    numbers = (f"{len(upsets)}/{len(rows)} cells won by a format that was not the majority before RL "
               f"(its share before: {spread(r['winner_share_before'] for r in upsets)}); {len(failures)} "
               f"won by a less accurate format with pass@1 falling")
    return _over_seeds("F4", "winner", seeds, numbers, "needs a repetition sweep: two or more mixtures "
                       "(e.g. 1, 2, 4, 8 copies of one format) in one seed")


def _scale_order(db) -> Callable[[str], tuple]:
    """Sort key of scale names, smallest first: the order the store recorded (by parameters), else the ladder."""
    ladder = store.meta(db).get("scales") or SCALE_LADDER
    return lambda name: (ladder.index(name), "") if name in ladder else (len(ladder), name)


def f5(db) -> Finding:
    rows, by_size = _rows(db, "finding_f5_scale"), _scale_order(db)

    def swept(g):   # mixture -> its cells, where run at two or more scales
        return {m: c for (m,), c in _groups(g, ("mixture",)).items() if len({r["scale"] for r in c}) >= 2}

    def winners(g):  # scale (smallest first) -> the formats its cells converged to
        return {z: sorted({str(r["winner"]) for r in g if r["scale"] == z})
                for z in sorted({r["scale"] for r in g}, key=by_size)}

    def described(mixture, w):
        return f"{mixture}: " + ", ".join(f"{z} -> {'/'.join(f)}" for z, f in w.items())

    def in_seed(mixtures):
        failed = []
        for mixture, g in sorted(mixtures.items()):
            w = winners(g)
            small, *_, large = w.values()
            if not ("text" not in small and large == ["text"]):
                failed.append(described(mixture, w))
        return not failed, ", ".join(failed)

    numbers = "; ".join(described(m, winners(g)) for m, g in sorted(swept(rows).items()))
    seeds = {s: in_seed(mixtures) for s, g in _by_seed(rows).items() if (mixtures := swept(g))}
    return _over_seeds("F5", "scale", seeds, numbers, "needs PPO at KL 0 at two or more scales on one mixture")


def f6(db) -> Finding:
    rows = _rows(db, "finding_f6_algorithms")
    models = {k: {r["algo"]: r for r in g} for k, g in _groups(rows, ("mixture", "scale", "seed")).items()}
    complete = {k: a for k, a in models.items() if {"ppo", "grpo", "ei"} <= set(a)}

    def in_seed(ms):
        failed = []
        for (mixture, scale), a in sorted(ms.items()):
            ppo, grpo, ei = a["ppo"], a["grpo"], a["ei"]
            if not (grpo["winner_share_after"] >= COLLAPSE_SHARE and ei["pass1_after"] < ppo["pass1_after"]
                    and ei["shift"] < ppo["shift"]):
                failed.append(f"{mixture}/{scale} GRPO winner share {grpo['winner_share_after']:.2f}, EI vs PPO "
                              f"pass@1 {ei['pass1_after']:.3g} vs {ppo['pass1_after']:.3g}, shift "
                              f"{ei['shift']:.2f} vs {ppo['shift']:.2f}")
        return not failed, ", ".join(failed)

    by_seed: dict[int, dict] = {}
    for (mixture, scale, seed), a in complete.items():
        by_seed.setdefault(seed, {})[(mixture, scale)] = a
    col = lambda algo, key: [a[algo][key] for a in complete.values()]   # noqa: E731
    numbers = (f"pass@1 after RL: PPO {spread(col('ppo', 'pass1_after'))}, GRPO {spread(col('grpo', 'pass1_after'))}, "
               f"EI {spread(col('ei', 'pass1_after'))}; winner's share shift: PPO {spread(col('ppo', 'shift'))}, "
               f"GRPO {spread(col('grpo', 'shift'))}, EI {spread(col('ei', 'shift'))}; GRPO winner share "
               f"{spread(col('grpo', 'winner_share_after'))}")
    return _over_seeds("F6", "algorithms", {s: in_seed(ms) for s, ms in by_seed.items()}, numbers,
                       "needs PPO, GRPO and EI at KL 0 on the same model")


def f7(db) -> Finding:
    rows = _rows(db, "finding_f7_transfer")

    def in_seed(g):
        change = {b: _mean(r["pass1_change"] for r in c) for (b,), c in sorted(_groups(g, ("benchmark",)).items())}
        return (all(v >= TRANSFER_POINTS for v in change.values()),
                ", ".join(f"{b} pass@1 {v:+.3g}" for b, v in change.items()))

    numbers = "; ".join(f"{b}: pass@1 {spread(r['pass1_before'] for r in g)} -> {spread(r['pass1_after'] for r in g)} "
                        f"({len(g)} cells)" for (b,), g in sorted(_groups(rows, ("benchmark",)).items()))
    return _over_seeds("F7", "transfer", {s: in_seed(g) for s, g in _by_seed(rows).items()}, numbers,
                       "needs a second benchmark (eval.benchmarks) besides the first")


FINDINGS = (f1, f2, f3, f4, f5, f6, f7)


def judge(db_path: str | os.PathLike) -> list[Finding]:
    """The seven findings of the store at ``db_path``, F1 first."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"no results store at {db_path}; run the workflow first (make run)")
    return [f(db_path) for f in FINDINGS]


def machine_line(db_path: str | os.PathLike) -> str:
    """Where the store's cells were trained, in one line (the ingest's summary of their machine.json)."""
    return store.meta(db_path).get("machine") or "not recorded (no cell of this store wrote machine.json)"


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
