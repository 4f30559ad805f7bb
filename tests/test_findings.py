"""`echochamber findings`: the paper's F1-F7 judged from a store, each by its saved query and a fixed criterion."""

import json
import subprocess
import sys

import pytest

from echochamber import findings, grid, store
from echochamber.formats import FORMATS
from test_store import _write

BASE_SHARES = {"tinygsm": 0.4, "omi1": 0.45, "text": 0.15}


def shares(winner: str | None, t: float, start=BASE_SHARES) -> dict:
    """``start`` moved a fraction ``t`` of the way onto ``winner``."""
    return {f: (1 - t) * start[f] + t * (f == winner) for f in FORMATS}


def metric(step, sh, pass1, pass_k, maj_k, accs=None):
    accs = accs or {"tinygsm": 0.6, "omi1": 0.5, "text": 0.0}
    return {"step": step, "n_problems": 64, "n_samples": 4, "k": 4, "temperature": 0.7, "top_p": 0.95,
            "pass1": pass1, "pass_k": pass_k, "maj_k": maj_k, "mean_acc": pass1,
            **{f"share_{f}": sh[f] for f in FORMATS}, **{f"acc_{f}": accs[f] for f in FORMATS},
            "unparsable_rate": 0.0, "response_len": 80.0, "trunc_rate": 0.0}


def write_cell(root, cell, *, winner="omi1", collapse_at=4, steps=10, checkpoints=(1, 3, 10),
               pass1=(0.5, 0.55, 0.7, 0.72), pass_k=(0.8, 0.85, 0.8, 0.7), maj_k=(0.5, 0.6, 0.65, 0.7),
               final_t=1.0, hard=(0.05, 0.1), accs=None, machine=None):
    """One RL cell (and its base model's evaluations): rollout shares reach 90%+ at ``collapse_at``
    (never when None); ``pass1``/``pass_k``/``maj_k`` are at step 0 and each checkpoint; pass@1 on the
    second benchmark ``hard`` before and after (no second benchmark when None); ``machine``: the cell's
    machine.json."""
    m, z, a, kl, s = (cell[k] for k in ("mixture", "scale", "algo", "kl", "seed"))
    cid = f"mixture={m}/scale={z}/algo={a}/kl={kl:g}/seed={s}"
    files = []
    rows = []
    for step in range(1, steps + 1):
        t = 0.95 if collapse_at is not None and step >= collapse_at else 0.5 * step / steps
        rows.append({"step": step, "episode": 0, "reward": 0.5,
                     **{f"share_{f}": v for f, v in shares(winner, t).items()},
                     **{f"acc_{f}": 0.5 for f in FORMATS}, "kl_div": 0.0, "entropy": 1.0, "clip_frac": 0.0,
                     "approx_kl": 0.0, "value_loss": 0.1, "response_len": 80.0, "trunc_rate": 0.0,
                     "tokens_per_s": 1e4})
    files.append(_write(rows, root / f"rl/{cid}/steps.parquet"))
    evals = [metric(st, shares(winner, final_t * i / len(checkpoints)), pass1[i], pass_k[i], maj_k[i], accs)
             for i, st in enumerate(checkpoints, start=1)]
    files.append(_write(evals, root / f"eval/{cid}/benchmark=test/metrics.parquet"))
    base = root / f"eval/mixture={m}/scale={z}/algo=base/kl=0/seed={s}"
    files.append(_write([metric(0, BASE_SHARES, pass1[0], pass_k[0], maj_k[0], accs)],
                        base / "benchmark=test/metrics.parquet"))
    if hard is not None:
        files.append(_write([metric(checkpoints[-1], shares(winner, final_t), hard[1], hard[1], hard[1])],
                            root / f"eval/{cid}/benchmark=hard/metrics.parquet"))
        files.append(_write([metric(0, BASE_SHARES, hard[0], hard[0], hard[0])],
                            base / "benchmark=hard/metrics.parquet"))
    if machine is not None:
        (root / f"rl/{cid}/machine.json").write_text(json.dumps(machine))
        files.append(str(root / f"rl/{cid}/machine.json"))
    return files


def build(tmp_path, cells, scales=None):
    files = sorted({f for c in cells for f in write_cell(tmp_path, c["cell"], **c.get("kw", {}))})
    db = tmp_path / "echo.duckdb"
    store.build(db, files, benchmarks=["test", "hard"], scales=scales)
    return {f.id: f for f in findings.judge(db)}, db


def cell(algo="ppo", kl=0.0, seed=0, mixture="mix", scale="s"):
    return {"mixture": mixture, "scale": scale, "algo": algo, "kl": kl, "seed": seed}


def test_the_embedded_grid_measures_five_findings_and_names_the_cells_the_others_need(tmp_path):
    grid = [{"cell": cell("ppo")}, {"cell": cell("grpo")},
            {"cell": cell("ppo", 0.01), "kw": {"final_t": 0.6, "collapse_at": None, "pass_k": (0.8, 0.85, 0.85, 0.85)}},
            {"cell": cell("ei"), "kw": {"steps": 3, "checkpoints": (1, 2, 3), "final_t": 0.4, "collapse_at": None,
                                        "pass1": (0.5, 0.55, 0.6, 0.62)}}]
    got, db = build(tmp_path, grid)
    assert list(got) == ["F1", "F2", "F3", "F4", "F5", "F6", "F7"]
    assert got["F1"].verdict == findings.REPRODUCED and "2/2 cells" in got["F1"].numbers
    assert got["F2"].verdict == findings.REPRODUCED
    assert got["F3"].verdict == findings.REPRODUCED and "KL 0.01" in got["F3"].numbers
    assert got["F4"].verdict == findings.NOT_MEASURABLE and "mixtures" in got["F4"].numbers
    assert got["F5"].verdict == findings.NOT_MEASURABLE and "scales" in got["F5"].numbers
    assert got["F6"].verdict == findings.REPRODUCED
    assert got["F7"].verdict == findings.REPRODUCED and "hard" in got["F7"].numbers
    # every finding reads a saved query over the store, which users can run themselves
    for n in range(1, 8):
        assert any(name.startswith(f"finding_f{n}_") for name in store.saved_queries())


def test_collapse_late_or_never_is_not_reproduced(tmp_path):
    late, _ = build(tmp_path / "late", [{"cell": cell("ppo"), "kw": {"collapse_at": 10, "steps": 10}},
                                        {"cell": cell("grpo")}])
    # the largest pass@1 gain ends at step 3, collapse at step 10 of 10: more than 5 steps apart
    assert late["F1"].verdict == findings.NOT_REPRODUCED and "1/2 cells" in late["F1"].numbers
    never, _ = build(tmp_path / "never", [{"cell": cell("ppo"), "kw": {"collapse_at": None}}])
    assert never["F1"].verdict == findings.NOT_REPRODUCED


def test_kl_that_keeps_nothing_does_not_reproduce_f3(tmp_path):
    got, _ = build(tmp_path, [{"cell": cell("ppo")}, {"cell": cell("ppo", 0.01)}])
    assert got["F3"].verdict == findings.NOT_REPRODUCED


def test_scale_and_winner_with_two_scales_and_two_mixtures(tmp_path):
    prose_at_scale = [{"cell": cell(scale="s"), "kw": {"winner": "tinygsm"}},
                      {"cell": cell(scale="m"), "kw": {"winner": "text"}},
                      {"cell": cell(mixture="mix2", scale="s"), "kw": {"winner": "omi1"}}]
    got, _ = build(tmp_path / "a", prose_at_scale)
    assert got["F5"].verdict == findings.REPRODUCED and "s -> tinygsm" in got["F5"].numbers
    # the base majority is omi1 (45%): two of three cells were won by another format
    assert got["F4"].verdict == findings.REPRODUCED and got["F4"].numbers.startswith("1/1 seeds; 2/3 cells")
    same, _ = build(tmp_path / "b", [{"cell": cell(scale="s")}, {"cell": cell(scale="m")},
                                     {"cell": cell(mixture="mix2")}])
    assert same["F5"].verdict == findings.NOT_REPRODUCED and same["F4"].verdict == findings.NOT_REPRODUCED


def test_scales_are_compared_by_size_whatever_their_names(tmp_path):
    """Names that sort the wrong way ("big" < "small"): the ingest records the grid's scales by parameters."""
    cfg = {"scales": {"big": {"d_model": 128, "n_layers": 4, "mlp_hidden": 512},
                      "small": {"d_model": 96, "n_layers": 3, "mlp_hidden": 384}},
           "grid": {"mixtures": ["mix"], "scales": ["big", "small"], "seeds": [0]}}
    order = grid.scales_by_size(cfg)
    assert order == ["small", "big"]
    cells = [{"cell": cell(scale="small"), "kw": {"winner": "tinygsm"}},
             {"cell": cell(scale="big"), "kw": {"winner": "text"}}]
    got, db = build(tmp_path / "sized", cells, scales=order)
    assert store.meta(db)["scales"] == ["small", "big"]
    assert got["F5"].verdict == findings.REPRODUCED
    assert got["F5"].numbers == "1/1 seeds; mix: small -> tinygsm, big -> text"
    by_name, _ = build(tmp_path / "unsized", cells)   # an older store: unknown names sort by name
    assert by_name["F5"].verdict == findings.NOT_REPRODUCED


def test_numbers_spread_over_seeds(tmp_path):
    got, _ = build(tmp_path, [{"cell": cell(seed=0)}, {"cell": cell(seed=1), "kw": {"collapse_at": 6}}])
    assert "collapse step 5 ± 1.4 (n=2)" in got["F1"].numbers
    assert findings.spread([0.5]) == "0.5" and findings.spread([None]) == "-"


def test_cli_prints_seven_rows_the_machine_and_a_missing_store_in_one_line(tmp_path):
    machine = {"cpu_model": "Test CPU 9000", "logical_cpus": 2, "gpus": None}
    _, db = build(tmp_path / "a", [{"cell": cell("ppo"), "kw": {"machine": machine}}])
    out = subprocess.run([sys.executable, "-m", "echochamber.cli", "findings", "--db", str(db)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["finding", "name", "verdict"]
    assert [ln.split()[0] for ln in lines[1:8]] == [f"F{n}" for n in range(1, 8)]
    assert lines[8:] == ["machine: CPU Test CPU 9000 (no AVX2); GPU none; torch threads ? (1 cell)"]
    _, unrecorded = build(tmp_path / "b", [{"cell": cell("ppo")}])      # cells that wrote no machine.json
    assert findings.machine_line(unrecorded).startswith("not recorded")
    missing = subprocess.run([sys.executable, "-m", "echochamber.cli", "findings", "--db", str(tmp_path / "no.duckdb")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "no.duckdb" in missing.stderr


@pytest.mark.parametrize("held, n, verdict", [
    (8, 8, findings.REPRODUCED), (7, 8, findings.REPRODUCED), (6, 8, findings.NOT_REPRODUCED),
    (3, 3, findings.REPRODUCED), (2, 3, findings.NOT_REPRODUCED), (2, 2, findings.REPRODUCED),
    (1, 2, findings.NOT_REPRODUCED), (1, 1, findings.REPRODUCED), (0, 1, findings.NOT_REPRODUCED),
    (0, 0, findings.NOT_MEASURABLE)])
def test_the_verdict_rule_needs_seven_of_eight_seeds_rounded_up(held, n, verdict):
    assert findings.verdict([True] * held + [False] * (n - held)) == verdict


@pytest.mark.parametrize("n_seeds, failing, verdict", [
    (8, [3], findings.REPRODUCED), (8, [3, 5], findings.NOT_REPRODUCED),
    (2, [1], findings.NOT_REPRODUCED)])   # one good seed cannot decide against a bad one
def test_a_verdict_counts_the_seeds_and_names_those_that_failed(tmp_path, n_seeds, failing, verdict):
    got, _ = build(tmp_path, [{"cell": cell(seed=s), "kw": {"collapse_at": None} if s in failing else {}}
                              for s in range(n_seeds)])
    failed = "; ".join(f"seed {s}: 0/1 cells collapse in time" for s in failing)
    assert got["F1"].verdict == verdict
    assert got["F1"].numbers.startswith(f"{n_seeds - len(failing)}/{n_seeds} seeds ({failed}); ")


@pytest.mark.parametrize("fid, query, change, threshold, good, bad", [
    ("F2", "finding_f2_diversity", "pass1_after - pass1_before", 0,
     {"pass1": (0.5, 0.55, 0.7, 0.9)}, {"pass1": (0.5, 0.45, 0.4, 0.4)}),
    ("F7", "finding_f7_transfer", "pass1_change", findings.TRANSFER_POINTS,
     {"hard": (0.0, 0.1)}, {"hard": (0.05, 0.05)}),
])
def test_one_failing_seed_is_not_hidden_by_the_mean_over_seeds(tmp_path, fid, query, change, threshold, good, bad):
    got, db = build(tmp_path, [{"cell": cell(seed=0), "kw": good}, {"cell": cell(seed=1), "kw": bad}])
    assert store.fetch(db, query).eval(change).mean() > threshold     # the cells pooled would pass
    assert got[fid].verdict == findings.NOT_REPRODUCED and got[fid].numbers.startswith("1/2 seeds (seed 1: ")


KEEPS_FORMATS = {"final_t": 0.6, "collapse_at": None, "pass_k": (0.8, 0.85, 0.85, 0.85)}   # a KL that works
MILD_EI = {"steps": 3, "checkpoints": (1, 2, 3), "final_t": 0.4, "collapse_at": None, "pass1": (0.5, 0.55, 0.6, 0.62)}
# Per finding: a grid where it is reproduced, one where it is not, and one that lacks the cells it needs.
VERDICT_GRIDS = {
    "F1": ([{"cell": cell("ppo")}, {"cell": cell("grpo")}],
           [{"cell": cell("ppo")}, {"cell": cell("grpo"), "kw": {"collapse_at": None}}],
           [{"cell": cell("ei")}, {"cell": cell("ppo", 0.01)}]),
    "F2": ([{"cell": cell("ppo")}],
           [{"cell": cell("ppo"), "kw": {"pass1": (0.5, 0.45, 0.4, 0.4)}}],
           [{"cell": cell("ei")}, {"cell": cell("grpo", 0.01)}]),
    "F3": ([{"cell": cell("ppo")}, {"cell": cell("ppo", 0.01), "kw": KEEPS_FORMATS}],
           [{"cell": cell("ppo")}, {"cell": cell("ppo", 0.01)}],
           [{"cell": cell("ppo", seed=0)}, {"cell": cell("ppo", 0.01, seed=1), "kw": KEEPS_FORMATS}]),
    "F4": ([{"cell": cell(mixture="a"), "kw": {"winner": "tinygsm"}}, {"cell": cell(mixture="b")}],
           [{"cell": cell(mixture="a")}, {"cell": cell(mixture="b")}],
           [{"cell": cell(mixture="a", seed=0), "kw": {"winner": "tinygsm"}}, {"cell": cell(mixture="b", seed=1)}]),
    "F5": ([{"cell": cell(scale="s"), "kw": {"winner": "tinygsm"}},
            {"cell": cell(scale="m"), "kw": {"winner": "text"}}],
           [{"cell": cell(scale="s")}, {"cell": cell(scale="m"), "kw": {"winner": "text"}},   # one mixture of two
            {"cell": cell(mixture="mix2", scale="s")}, {"cell": cell(mixture="mix2", scale="m")}],
           [{"cell": cell(scale="s", seed=0), "kw": {"winner": "tinygsm"}},
            {"cell": cell(scale="m", seed=1), "kw": {"winner": "text"}}]),
    "F6": ([{"cell": cell("ppo")}, {"cell": cell("grpo")}, {"cell": cell("ei"), "kw": MILD_EI}],
           [{"cell": cell("ppo")}, {"cell": cell("grpo")}, {"cell": cell("ei")}],
           [{"cell": cell("ppo")}, {"cell": cell("grpo")}, {"cell": cell("ei", seed=1), "kw": MILD_EI}]),
    "F7": ([{"cell": cell("ppo")}, {"cell": cell("ei")}],
           [{"cell": cell("ppo")}, {"cell": cell("ei"), "kw": {"hard": (0.05, 0.05)}}],   # +5 and +0 points
           [{"cell": cell("ppo"), "kw": {"hard": None}}]),
}
VERDICTS = (findings.REPRODUCED, findings.NOT_REPRODUCED, findings.NOT_MEASURABLE)


@pytest.mark.parametrize("fid, verdict, grid", [
    pytest.param(fid, verdict, g, id=f"{fid}-{verdict}")
    for fid, grids in VERDICT_GRIDS.items() for verdict, g in zip(VERDICTS, grids)])
def test_every_finding_reaches_each_of_its_verdicts(tmp_path, fid, verdict, grid):
    got, _ = build(tmp_path, grid)
    assert got[fid].verdict == verdict, got[fid].numbers
    assert got[fid].numbers.startswith("needs" if verdict == findings.NOT_MEASURABLE else "1/1 seeds" if
                                       verdict == findings.REPRODUCED else "0/1 seeds (seed 0: ")


def test_default_store_is_the_one_of_the_config_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert findings.default_db() == findings.Path("results/echo.duckdb")
    (tmp_path / "config.yaml").write_text("results: out\n")
    assert findings.default_db() == findings.Path("out/echo.duckdb")
    # a grid run as `--configfile config.yaml configs/mini_paper.yaml`: the overlay's results folder
    from conftest import ROOT

    assert findings.default_db(ROOT / "config.yaml", ROOT / "configs" / "mini_paper.yaml") == \
        findings.Path("results_mini_paper/echo.duckdb") == findings.default_db(ROOT / "configs" / "mini_paper.yaml")


def write_curve(root, mixture="mix", scale="s", seed=0, steps=100, drop_at=40):
    """A pretraining loss curve: a plateau at 0.8, a drop to 0.3 at ``drop_at`` (never when None)."""
    rows = [{"step": s, "tokens": 2048 * s, "loss": 0.8 if drop_at is None or s < drop_at else 0.3, "lr": 1e-3,
             "grad_norm": 1.0, "tokens_per_s": 1e4} for s in range(1, steps + 1)]
    return _write(rows, root / f"pretrain/mixture={mixture}/scale={scale}/seed={seed}/curve.parquet")


def test_seed_sweep_query_says_per_seed_when_the_skill_came_and_whether_ppo_showed_the_phenomenon(tmp_path):
    """queries/seed_sweep.sql: onset is where the 50-step mean loss crosses the midpoint of its 20%-of-training
    and final values; skill and phenomenon are the seed sweep's criteria (configs/seeds.yaml)."""
    skilled = {"tinygsm": 0.9, "omi1": 0.8, "text": 0.05}
    files = [write_curve(tmp_path, seed=0, drop_at=40), write_curve(tmp_path, seed=1, drop_at=80),
             write_curve(tmp_path, seed=2, drop_at=30)]
    files += write_cell(tmp_path, cell(seed=0), accs=skilled, pass1=(0.1, 0.5, 0.7, 0.8))
    files += write_cell(tmp_path, cell(seed=1), accs=skilled, pass1=(0.1, 0.5, 0.7, 0.8))       # late onset
    files += write_cell(tmp_path, cell(seed=2), accs=skilled, pass1=(0.75, 0.8, 0.8, 0.8))      # +5 points only
    db = tmp_path / "echo.duckdb"
    store.build(db, sorted(set(files)), benchmarks=["test", "hard"])
    rows = store.fetch(db, store.resolve_sql("seed_sweep")).set_index("seed")
    # the 50-step mean is a ramp from the drop over 50 steps: it crosses the midpoint 0.55 half-way, 25 steps on
    assert rows.loc[0, "onset_step"] == 65 and rows.loc[0, "onset_frac"] == 0.65
    # a drop at 80% of 100 steps: the final 50-step mean holds 21 steps after it, so the midpoint is 0.695
    assert rows.loc[2, "onset_step"] == 55 and rows.loc[1, "onset_step"] == 90
    assert rows.loc[0, "collapse_step"] == 4 and rows.loc[0, "winner"] == "omi1"
    assert rows.loc[0, "pass1_before"] == 0.1 and rows.loc[0, "pass1_after"] == 0.8
    assert rows["skill"].tolist() == [False, False, True]        # onsets at 65% and 90% of the steps are late
    assert rows["phenomenon"].tolist() == [True, True, False]
