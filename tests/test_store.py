"""The DuckDB results store: typed coordinates, atomic ingest (killed ingest, held readers), queries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echochamber import store
from echochamber.evaluate import GENERATION_COLUMNS, METRIC_COLUMNS
from echochamber.formats import FORMATS

STEPS = (0, 2, 5, 10)


def _write(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _shares(start: dict, winner: str, t: float) -> dict:
    """Shares moving from ``start`` (t=0) to all-``winner`` (t=1)."""
    return {f: (1 - t) * start[f] + t * (f == winner) for f in FORMATS}


def write_fake_results(root: Path, cells: list[dict], benchmarks=("test", "hard"),
                       start=None, winner="tinygsm") -> tuple[list[str], list[dict]]:
    """Per-cell files as the pretrain, RL and eval stages write them; returns (files, grid cells).

    ``cells`` are RL cells (mixture, scale, algo, kl, seed); their base cells are added. Shares move
    from ``start`` to the ``winner`` over the RL steps, faster for a smaller KL. Each pretraining and RL
    cell's machine.json (FAKE_MACHINE) comes last in the files.
    """
    start = start or {"tinygsm": 0.3, "omi1": 0.2, "text": 0.5}
    files, grid, machines = [], [], []
    bases = sorted({(c["mixture"], c["scale"], c["seed"]) for c in cells})
    for m, z, s in bases:
        d = root / f"pretrain/mixture={m}/scale={z}/seed={s}"
        files.append(_write([{"step": i, "tokens": 1000 * i, "loss": 5.0 / (i + 1), "lr": 1e-3, "grad_norm": 1.0,
                              "tokens_per_s": 5e4} for i in range(1, 6)], d / "curve.parquet"))
        machines.append(d / "machine.json")
        grid.append({"mixture": m, "scale": z, "algo": "base", "kl": 0.0, "seed": s})
        for b in benchmarks:
            e = root / f"eval/mixture={m}/scale={z}/algo=base/kl=0/seed={s}/benchmark={b}"
            files.append(_write([_metric_row(0, start, 0.2)], e / "metrics.parquet"))
            files.append(_write(_generation_rows(0), e / "generations.parquet"))
    for c in cells:
        grid.append(dict(c))
        cid = f"mixture={c['mixture']}/scale={c['scale']}/algo={c['algo']}/kl={c['kl']:g}/seed={c['seed']}"
        speed = 1.0 / (1.0 + 100 * c["kl"])
        rows = []
        for step in range(1, 11):
            t = min(1.0, speed * step / 10)
            sh = _shares(start, winner, t)
            rows.append({"step": step, "episode": step / 10, "reward": 0.2 + 0.4 * t, "kl_div": 0.01 * step,
                         **{f"share_{f}": sh[f] for f in FORMATS}, **{f"acc_{f}": 0.5 for f in FORMATS},
                         "entropy": 1.0, "clip_frac": 0.1, "approx_kl": 0.001, "value_loss": 0.5,
                         "response_len": 80.0, "trunc_rate": 0.0, "tokens_per_s": 1e4})
        files.append(_write(rows, root / f"rl/{cid}/steps.parquet"))
        machines.append(root / f"rl/{cid}/machine.json")
        files.append(_write([{"step": 1, "prompt": "Q?\n\n", "completion": "x \\boxed{1}", "format": "text",
                              "correct": True, "answer": "1", "error": None}], root / f"rl/{cid}/samples.parquet"))
        for b in benchmarks:
            e = root / f"eval/{cid}/benchmark={b}"
            mrows = [_metric_row(st, _shares(start, winner, min(1.0, speed * st / 10)), 0.2 + 0.04 * st * speed)
                     for st in STEPS[1:]]
            files.append(_write(mrows, e / "metrics.parquet"))
            files.append(_write([r for st in STEPS[1:] for r in _generation_rows(st)], e / "generations.parquet"))
    for m in machines:
        m.write_text(json.dumps(FAKE_MACHINE))
    return files + [str(m) for m in machines], grid


FAKE_MACHINE = {"cpu_model": "Fake CPU", "cpu_flags": "avx2 fma", "logical_cpus": 2, "torch_threads": 2, "gpus": None}


def _metric_row(step: int, shares: dict, pass1: float) -> dict:
    return {"step": step, "n_problems": 10, "n_samples": 4, "k": 4, "temperature": 0.7, "top_p": 0.95,
            "pass1": pass1, "pass_k": min(1.0, pass1 + 0.3 - 0.01 * step), "maj_k": pass1 + 0.05,
            "mean_acc": pass1, **{f"share_{f}": shares[f] for f in FORMATS},
            **{f"acc_{f}": 0.4 for f in FORMATS}, "unparsable_rate": 0.1, "response_len": 70.0, "trunc_rate": 0.0}


def _generation_rows(step: int) -> list[dict]:
    return [{"step": step, "problem_id": f"p{i}", "kind": "greedy", "sample": 0, "question": "Q?", "gold": "1",
             "completion": "\\boxed{1}", "format": "text", "answer": "1", "correct": True, "error": None,
             "n_tokens": 5, "truncated": False} for i in range(2)]


CELLS = [
    {"mixture": "mixA", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 0},
    {"mixture": "mixA", "scale": "s", "algo": "ppo", "kl": 0.01, "seed": 0},
]


@pytest.fixture()
def results(tmp_path):
    files, grid = write_fake_results(tmp_path / "results", CELLS)
    return tmp_path / "results", files, grid


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ build


def test_fake_results_match_the_producers_schemas():
    # the fakes must stay in step with what evaluate writes, or these tests test nothing
    row = _metric_row(0, {f: 1 / 3 for f in FORMATS}, 0.1)
    assert list(row) == list(METRIC_COLUMNS)
    assert list(_generation_rows(0)[0]) == list(GENERATION_COLUMNS)


def test_build_types_coordinates_and_tables(results):
    root, files, grid = results
    db = root / "echo.duckdb"
    counts = store.build(db, files, cells=grid, benchmarks=["test", "hard"])
    assert counts["evals"] == 2 * (1 + 2 * 3)   # base step 0 + 2 cells x 3 steps, for 2 benchmarks
    assert counts["rl_steps"] == 20 and counts["pretrain_curves"] == 5 and counts["cells"] == 3
    con = duckdb.connect(str(db), read_only=True)
    try:
        for table in ("cells", "pretrain_curves", "rl_steps", "evals", "samples", "generations"):
            types = dict(con.execute(f"SELECT column_name, data_type FROM information_schema.columns "
                                     f"WHERE table_name = '{table}'").fetchall())
            assert (types["mixture"], types["scale"], types["algo"]) == ("VARCHAR",) * 3, table
            assert types["kl"] == "DOUBLE" and types["seed"] == "INTEGER", table
            if table != "cells":
                assert types["step"] == "INTEGER", table
        # the measured KL of the RL log does not clobber the cell's KL coefficient
        kl, kl_div = con.execute("SELECT kl, kl_div FROM rl_steps WHERE kl > 0 AND step = 3").fetchone()
        assert kl == 0.01 and kl_div == pytest.approx(0.03)
        assert con.execute("SELECT DISTINCT algo, kl FROM pretrain_curves").fetchall() == [("base", 0.0)]
        # one GROUP BY answers a question across cells
        by_kl = dict(con.execute("SELECT kl, max(share_tinygsm) FROM evals WHERE algo = 'ppo' "
                                 "AND benchmark = 'test' GROUP BY kl").fetchall())
        assert by_kl[0.0] > by_kl[0.01]
        # the base model is step 0 of every RL cell in eval_curves
        rows = con.execute("SELECT kl, step FROM eval_curves WHERE benchmark = 'test' ORDER BY kl, step").fetchall()
        assert rows == [(0.0, s) for s in STEPS] + [(0.01, s) for s in STEPS]
        status = con.execute("SELECT algo, kl, status FROM cells ORDER BY algo, kl").fetchall()
        assert status == [("base", 0.0, "evaluated"), ("ppo", 0.0, "evaluated"), ("ppo", 0.01, "evaluated")]
        assert json.loads(con.execute("SELECT value FROM meta WHERE key = 'benchmarks'").fetchone()[0]) == [
            "test", "hard"]
    finally:
        con.close()


def test_empty_grid_parts_give_empty_typed_tables(tmp_path):
    files, grid = write_fake_results(tmp_path / "r", CELLS[:1], benchmarks=("test",))
    pretrain_only = [f for f in files if "/pretrain/" in f]
    db = tmp_path / "r" / "echo.duckdb"
    counts = store.build(db, pretrain_only, cells=grid, benchmarks=["test"])
    assert counts["rl_steps"] == 0 and counts["evals"] == 0
    out = store.query(db, "SELECT algo, status FROM cells ORDER BY algo", fmt="json")
    assert json.loads(out) == [{"algo": "base", "status": "pretrained"}, {"algo": "ppo", "status": "missing"}]
    # saved queries still run on an empty store
    assert "(0 rows)" in store.query(db, "pass1_before_after")


def test_missing_or_corrupt_input_is_one_clear_sentence(results, tmp_path):
    root, files, grid = results
    db = root / "echo.duckdb"
    with pytest.raises(store.StoreError, match=r"does not exist"):
        store.build(db, files + [str(root / "rl/mixture=x/scale=s/algo=ppo/kl=0/seed=0/steps.parquet")])
    bad = root / "rl/mixture=mixA/scale=s/algo=ppo/kl=0/seed=0/steps.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(store.StoreError) as e:
        store.build(db, files)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not db.exists()
    with pytest.raises(store.StoreError, match="coordinates"):
        store.coordinates(tmp_path / "somewhere/steps.parquet")


def test_allow_missing_marks_cells(results):
    root, files, grid = results
    kept = [f for f in files if "kl=0.01" not in f]
    counts = store.build(root / "echo.duckdb", kept + [str(root / "nope/steps.parquet")], cells=grid,
                         benchmarks=["test", "hard"], allow_missing=True)
    assert counts["cells"] == 3
    status = store.query(root / "echo.duckdb", "SELECT kl, status FROM cells WHERE algo = 'ppo' ORDER BY kl",
                         fmt="csv")
    assert status.splitlines() == ["kl,status", "0.0,evaluated", "0.01,missing"]


# ------------------------------------------------------------------------------------------ atomicity

_SLOW_INGEST = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from echochamber import store
    db, marker, files = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    real = store._create_table
    def slow(con, spec, fs):
        n = real(con, spec, fs)
        marker.write_text(spec.name)      # at least one table is in the temporary file now
        time.sleep(120)
        return n
    store._create_table = slow
    store.build(db, files)
""")


def test_killed_ingest_leaves_previous_store_intact(results, tmp_path):
    root, files, grid = results
    db = root / "echo.duckdb"
    store.build(db, files[:4])              # the previous store: the base cell only
    before = _digest(db)
    before_rows = store.query(db, "SELECT count(*) AS n FROM evals", fmt="csv")
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INGEST, str(db), str(marker), *files])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the ingest subprocess ended early"
            assert time.monotonic() < deadline, "the ingest subprocess never started writing"
            time.sleep(0.05)
        temporaries = list(root.glob(".echo.duckdb.tmp*"))
        assert temporaries, "the ingest should be writing a temporary file beside the store"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _digest(db) == before
    assert store.query(db, "SELECT count(*) AS n FROM evals", fmt="csv") == before_rows
    # the next ingest clears the leftovers of the killed one and succeeds
    store.build(db, files)
    assert not list(root.glob(".echo.duckdb.tmp*"))
    assert store.query(db, "SELECT count(*) AS n FROM evals", fmt="csv").split() == ["n", "14"]


def test_held_reader_neither_blocks_ingest_nor_sees_partial_store(results):
    root, files, grid = results
    db = root / "echo.duckdb"
    store.build(db, files[:4])
    held = duckdb.connect(str(db), read_only=True)
    try:
        old = held.execute("SELECT count(*) FROM evals").fetchone()[0]
        code = "import sys; from echochamber import store; store.build(sys.argv[1], sys.argv[2:])"
        done = subprocess.run([sys.executable, "-c", code, str(db), *files], timeout=120, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        # the held connection still reads the old, complete database
        assert held.execute("SELECT count(*) FROM evals").fetchone()[0] == old
        assert held.execute("SELECT count(*) FROM cells").fetchone()[0] == 1
    finally:
        held.close()
    fresh = subprocess.run([sys.executable, "-c", "import sys; from echochamber import store; "
                            "print(store.query(sys.argv[1], 'SELECT count(*) AS n FROM evals', fmt='csv'))",
                            str(db)], capture_output=True, text=True, timeout=120)
    assert fresh.stdout.split() == ["n", "14"], fresh.stderr


# ------------------------------------------------------------------------------------------ query


def test_query_formats_and_read_only(results):
    root, files, grid = results
    db = root / "echo.duckdb"
    store.build(db, files, cells=grid, benchmarks=["test", "hard"])
    sql = "SELECT algo, kl, count(*) AS n FROM rl_steps GROUP BY ALL ORDER BY kl"
    table = store.query(db, sql)
    assert table.splitlines()[0].split() == ["algo", "kl", "n"] and len(table.splitlines()) == 3
    assert store.query(db, sql, fmt="csv").splitlines() == ["algo,kl,n", "ppo,0.0,10", "ppo,0.01,10"]
    assert json.loads(store.query(db, sql, fmt="json")) == [{"algo": "ppo", "kl": 0.0, "n": 10},
                                                           {"algo": "ppo", "kl": 0.01, "n": 10}]
    with pytest.raises(store.StoreError, match="failed"):
        store.query(db, "DELETE FROM evals")
    with pytest.raises(store.StoreError, match="failed"):
        store.query(db, "SELECT nope FROM evals")
    with pytest.raises(store.StoreError, match="format"):
        store.query(db, sql, fmt="xml")
    with pytest.raises(store.StoreError, match="does not exist"):
        store.query(root / "missing.duckdb", sql)
    assert store.query(db, "SELECT count(*) AS n FROM evals", fmt="csv").split() == ["n", "14"]


def test_saved_queries_answer_the_papers_questions(results):
    root, files, grid = results
    db = root / "echo.duckdb"
    store.build(db, files, cells=grid, benchmarks=["test", "hard"])
    names = store.saved_queries()
    assert {"format_shares_over_steps", "pass1_before_after", "winning_format"} <= set(names)
    assert all(names.values())  # each starts with a comment saying what it answers
    before_after = json.loads(store.query(db, "pass1_before_after", fmt="json"))
    assert len(before_after) == 4   # 2 cells x 2 benchmarks
    row = next(r for r in before_after if r["kl"] == 0.0 and r["benchmark"] == "test")
    assert row["final_step"] == 10 and row["pass1_before"] == pytest.approx(0.2)
    assert row["pass1_after"] == pytest.approx(0.6) and row["pass1_gain"] == pytest.approx(0.4)
    won = json.loads(store.query(db, "winning_format", fmt="json"))
    assert [(r["kl"], r["winner"], r["majority_before"], r["winner_was_majority"]) for r in won] == [
        (0.0, "tinygsm", "text", False), (0.01, "tinygsm", "text", False)]
    assert won[0]["share_after"] == pytest.approx(1.0) and won[0]["share_before"] == pytest.approx(0.3)
    shares = json.loads(store.query(db, "format_shares_over_steps", fmt="json"))
    assert [r["step"] for r in shares if r["kl"] == 0.0 and r["benchmark"] == "test"] == list(STEPS)
    path_form = store.query(db, str(store.QUERIES_DIR / "winning_format.sql"), fmt="csv")
    assert path_form == store.query(db, "winning_format", fmt="csv")


# --- the store never guesses: every input checked against its table, each cell once ------------------

def _rewrite(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


@pytest.mark.parametrize("fault, words", [
    ("truncated", ["is not a readable parquet file", "rule rl"]),
    ("missing_column", ["lacks the column(s) reward", "rule rl"]),
    ("wrong_type", ["column reward holds string", "needs DOUBLE", "rule rl"]),
])
def test_a_bad_input_file_is_one_sentence_naming_it_and_its_rule(results, fault, words):
    root, files, grid = results
    db = root / "echo.duckdb"
    store.build(db, files, cells=grid)
    before = db.read_bytes()
    bad = root / "rl/mixture=mixA/scale=s/algo=ppo/kl=0.01/seed=0/steps.parquet"
    if fault == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif fault == "missing_column":
        _rewrite(bad, lambda t: t.drop(["reward"]))
    else:
        _rewrite(bad, lambda t: t.set_column(t.column_names.index("reward"), "reward",
                                             pa.array([str(v) for v in t["reward"].to_pylist()])))
    with pytest.raises(store.StoreError) as e:
        store.build(db, files, cells=grid)
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    assert db.read_bytes() == before          # the previous complete store stays


def test_evaluation_files_name_the_rule_of_their_cell(results):
    root, files, grid = results
    base = root / "eval/mixture=mixA/scale=s/algo=base/kl=0/seed=0/benchmark=test/metrics.parquet"
    _rewrite(base, lambda t: t.drop(["pass1"]))
    with pytest.raises(store.StoreError, match="rule eval_base"):
        store.build(root / "echo.duckdb", files, cells=grid)


def test_the_same_cell_twice_is_an_error(results, tmp_path):
    root, files, grid = results
    with pytest.raises(store.StoreError, match="same cell of table rl_steps"):
        store.build(root / "echo.duckdb", files + [files[[Path(f).name for f in files].index("steps.parquet")]])
    # a copy of a cell's file under another name of the same cell (e.g. kl=0.010 beside kl=0.01)
    src = next(f for f in files if "kl=0.01/" in f and f.endswith("steps.parquet"))
    twin = Path(src.replace("kl=0.01/", "kl=0.010/"))
    twin.parent.mkdir(parents=True)
    twin.write_bytes(Path(src).read_bytes())
    with pytest.raises(store.StoreError, match="same cell"):
        store.build(root / "echo.duckdb", files + [str(twin)])


# --- where each cell was trained: the cells' machine.json in table machines and one meta line -----------

def test_machine_files_fill_the_machines_table_and_a_meta_line(results):
    root, files, grid = results
    db = root / "echo.duckdb"
    files = [f for f in files if not f.endswith("machine.json")]
    counts = store.build(db, files, cells=grid)        # cells that wrote no machine.json: no rows, no line
    assert counts["machines"] == 0 and "machine" not in store.meta(db)
    assert store.query(db, "SELECT count(*) AS n FROM machines", fmt="csv").split() == ["n", "0"]
    cpu = {"cpu_model": "Test CPU 9000", "cpu_flags": "avx2 fma", "logical_cpus": 16, "torch_threads": 8,
           "gpus": None, "torch": "2.0"}
    described = {root / "pretrain/mixture=mixA/scale=s/seed=0": cpu,
                 root / "rl/mixture=mixA/scale=s/algo=ppo/kl=0/seed=0": {**cpu, "gpus": "2 x Test GPU", "cuda": "12.8"}}
    for cell, d in described.items():
        (cell / "machine.json").write_text(json.dumps(d))
    machine_files = [str(cell / "machine.json") for cell in described]
    counts = store.build(db, files + machine_files, cells=grid)
    assert counts["machines"] == 2
    rows = json.loads(store.query(db, "SELECT * FROM machines ORDER BY algo", fmt="json"))
    assert [(r["algo"], r["kl"], r["seed"], r["gpus"], r["cuda"]) for r in rows] == [
        ("base", 0.0, 0, None, None), ("ppo", 0.0, 0, "2 x Test GPU", "12.8")]
    assert rows[0]["cpu_model"] == "Test CPU 9000" and rows[0]["logical_cpus"] == 16
    assert store.meta(db)["machine"] == "CPU Test CPU 9000 (avx2 fma); GPU 2 x Test GPU; torch threads 8 (2 cells)"
    (root / "rl/mixture=mixA/scale=s/algo=ppo/kl=0/seed=0/machine.json").write_text("{half")
    with pytest.raises(store.StoreError, match="rule rl") as e:
        store.build(db, files + machine_files, cells=grid)
    assert "machine.json is not a readable machine description" in str(e.value) and "\n" not in str(e.value)
