"""Where the time went: a per-stage wall-clock breakdown from Snakemake's job benchmarks.

Every job writes ``<results>/benchmarks/<stage>/...tsv`` when it ends (``s``: its wall seconds,
``cpu_time``: the CPU seconds of its processes). The file's modification time is the job's end, so
each job is the interval ``[mtime - s, mtime]``; a stage's wall clock is the length of the union of its
jobs' intervals (jobs that ran side by side count once). ``at once`` is the stage's job time over its
wall clock (how many of its jobs ran side by side on average) and ``cores`` its CPU time over its wall
clock: a lone job that keeps two threads busy shows ``cores`` near 2. Snakemake samples CPU time every
few seconds from the job's live processes, so short-lived children (the reward sandbox forks one per
snippet) are missed and ``cores`` is a lower bound.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

# Stages in the order the workflow runs them; any other benchmark folder is listed after these.
STAGE_ORDER = ("data", "tokenizer", "tokens", "mixtures", "pretrain", "base_models", "rl", "eval", "ingest",
               "report")


@dataclass(frozen=True)
class Job:
    stage: str
    start: float
    end: float
    cpu: float


def _stage(bench_dir: Path, tsv: Path) -> str:
    rel = tsv.relative_to(bench_dir)
    return rel.parts[0] if len(rel.parts) > 1 else tsv.stem


def read_jobs(bench_dir: str | os.PathLike) -> list[Job]:
    """One :class:`Job` per readable benchmark file under ``bench_dir`` (unreadable ones are skipped:
    a job killed while writing its benchmark has no timing to report)."""
    bench_dir = Path(bench_dir)
    jobs = []
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        try:
            with tsv.open() as f:
                row = next(csv.DictReader(f, delimiter="\t"))
            seconds, cpu = float(row["s"]), float(row.get("cpu_time") or "nan")
            end = tsv.stat().st_mtime
        except (OSError, StopIteration, KeyError, ValueError):
            continue
        jobs.append(Job(_stage(bench_dir, tsv), end - seconds, end, cpu))
    return jobs


def union_length(intervals) -> float:
    """Total length covered by a set of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def breakdown(jobs: list[Job]) -> list[dict]:
    """Rows ``stage, jobs, wall_s, job_s, cpu_s, at_once, cores`` in workflow order, then a ``total`` row."""
    stages = sorted({j.stage for j in jobs},
                    key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    rows = []
    for name in stages + ["total"]:
        mine = jobs if name == "total" else [j for j in jobs if j.stage == name]
        wall = union_length((j.start, j.end) for j in mine)
        cpu, job = sum(j.cpu for j in mine), sum(j.end - j.start for j in mine)
        rows.append({"stage": name, "jobs": len(mine), "wall_s": wall, "job_s": job, "cpu_s": cpu,
                     "at_once": job / wall if wall > 0 else float("nan"),
                     "cores": cpu / wall if wall > 0 else float("nan")})
    return rows


def format_breakdown(rows: list[dict]) -> str:
    """The breakdown as the table ``make run`` prints last."""
    if not rows or rows[-1]["jobs"] == 0:
        return ""
    lines = ["Where the time went (wall clock per stage from the job benchmarks; jobs side by side count once):",
             f"  {'stage':<12}{'jobs':>5}{'wall':>9}{'job time':>10}{'at once':>9}{'CPU time':>10}{'cores':>7}"]
    for r in rows:
        if r["stage"] == "total":
            lines.append("  " + "-" * 60)
        lines.append(f"  {r['stage']:<12}{r['jobs']:>5}{_clock(r['wall_s']):>9}{_clock(r['job_s']):>10}"
                     f"{r['at_once']:>9.2f}{_clock(r['cpu_s']):>10}{r['cores']:>7.2f}")
    lines.append("  (at once: the stage's jobs running side by side on average; cores: sampled CPU time over wall "
                 "clock, a lower bound)")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    if seconds != seconds:      # NaN: a benchmark without CPU time
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}" if m else f"{s} s"


def report(bench_dir: str | os.PathLike) -> str:
    return format_breakdown(breakdown(read_jobs(bench_dir)))
