"""The per-stage wall-clock breakdown that `make run` prints last, from Snakemake's job benchmarks."""

import os

import pytest

from echochamber import timing

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(root, rel, seconds, end, cpu):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{cpu}\n")
    os.utime(path, (end, end))
    return path


def test_union_length_counts_overlaps_once_and_gaps_not_at_all():
    assert timing.union_length([]) == 0
    assert timing.union_length([(0, 10), (5, 15)]) == 15
    assert timing.union_length([(0, 10), (2, 3), (20, 25)]) == 15
    assert timing.union_length([(20, 25), (0, 10)]) == 15


def test_breakdown_per_stage_in_workflow_order(tmp_path):
    t0 = 1_700_000_000
    bench(tmp_path, "data/source=a.tsv", 2, t0 + 2, 1.5)
    bench(tmp_path, "data/source=b.tsv", 2, t0 + 3, 1.5)              # overlaps a: stage wall 3 s
    bench(tmp_path, "pretrain/mixture=m/scale=s/seed=0.tsv", 100, t0 + 103, 190)
    bench(tmp_path, "rl/mixture=m/scale=s/algo=ppo/kl=0/seed=0.tsv", 50, t0 + 153, 45)
    bench(tmp_path, "rl/mixture=m/scale=s/algo=grpo/kl=0/seed=0.tsv", 40, t0 + 143, 38)
    bench(tmp_path, "ingest.tsv", 1, t0 + 160, 0.5)
    (tmp_path / "broken.tsv").write_text("s\th:m:s\n")                 # a job killed mid-write: skipped
    rows = {r["stage"]: r for r in timing.breakdown(timing.read_jobs(tmp_path))}
    assert list(rows) == ["data", "pretrain", "rl", "ingest", "total"]
    assert rows["data"]["wall_s"] == pytest.approx(3) and rows["data"]["jobs"] == 2
    assert rows["pretrain"]["cores"] == pytest.approx(1.9)
    assert rows["rl"]["wall_s"] == pytest.approx(50) and rows["rl"]["at_once"] == pytest.approx(1.8)
    # the total is the union of every job (the 4 s gap before ingest is not counted), not the sum of stages
    assert rows["total"]["jobs"] == 6 and rows["total"]["wall_s"] == pytest.approx(3 + 100 + 50 + 1)
    text = timing.format_breakdown(list(rows.values()))
    lines = text.splitlines()
    assert lines[0].startswith("Where the time went")
    assert [ln.split()[0] for ln in lines[2:6]] == ["data", "pretrain", "rl", "ingest"]
    assert "1:40" in text and "2:34" in text          # pretrain wall and the total


def test_no_benchmarks_no_table(tmp_path):
    assert timing.report(tmp_path) == ""
    assert timing.report(tmp_path / "missing") == ""
