"""Faults and edits on a tiny study run to the end once, through the real workflow.

A damaged pretrained model or RL checkpoint ends in one sentence whose advice, followed, reruns its writer
and restores every checkpoint of the curve, while the store stays the previous complete one; a changed KL
value replaces its cell in the store, summary, figures and findings (its old files stay on disk).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from conftest import snakemake
from echochamber import manifest
from test_manifest import flip_last_byte, one_sentence_advising

CELL = "mixture={mixture}/scale=xs/seed=0"


def store(db: Path) -> dict:
    """Every table of the store, rows sorted (its content, not its bytes)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}
    finally:
        con.close()


def curve(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT algo, benchmark, step FROM evals ORDER BY ALL").fetchall()
    finally:
        con.close()


def advice(proc) -> Path:
    """The folder the one-sentence error tells to delete (checked to be one sentence)."""
    err = proc.stdout + proc.stderr
    said = re.findall(r"^(?:Checkpoint|Evaluation) error: (.+)$", err, re.MULTILINE)
    assert proc.returncode != 0 and said, err[-3000:]
    sentence = said[0]
    folder = Path(re.search(r"delete the folder (\S+) and run snakemake again", sentence).group(1))
    one_sentence_advising(sentence, folder)
    return folder


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A tiny study run to the end once (pretraining, PPO, evaluation, store); the tests below damage it."""
    from conftest import tiny_config, write_config

    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config(root / "results")
    config = write_config(root / "config.yaml", cfg)
    snakemake("--cores", "2", f"--configfile={config}", cwd=root)
    results = root / "results"
    db = results / "echo.duckdb"
    return {"root": root, "config": config, "results": results, "db": db,
            "model": results / "pretrain" / CELL.format(mixture=cfg["grid"]["mixtures"][0]) / "model",
            "rl": next((results / "rl").rglob("checkpoints")), "curve": curve(db)}


def run(done, *args):
    return snakemake("--cores", "2", f"--configfile={done['config']}", *args, cwd=done["root"], check=False)


def test_a_damaged_pretrained_model_stops_in_one_sentence_whose_advice_reruns_pretraining(done):
    db, model = done["db"], done["model"]
    before = store(db)
    assert ("base", "test", 0) in done["curve"]
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    failed = run(done)
    assert advice(failed) == model
    assert store(db) == before                      # the previous complete store, untouched

    shutil.rmtree(model)                            # the advice
    again = run(done)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert re.search(r"^(local)?rule pretrain:", again.stdout + again.stderr, re.MULTILINE)
    manifest.verify(model)
    assert curve(db) == done["curve"]
    dry = run(done, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_a_damaged_or_deleted_rl_checkpoint_never_shortens_the_curve(done):
    db, rl = done["db"], done["rl"]
    steps = manifest.steps(rl)
    assert len(steps) >= 2 and [s for a, b, s in done["curve"] if (a, b) == ("ppo", "test")] == steps
    before = store(db)

    # same size, other bytes: the check before any job passes, the evaluation job's checksum stops it
    flip_last_byte(rl / f"step={steps[0]}" / "model.safetensors")
    failed = run(done, "--forcerun", "eval_rl")
    assert advice(failed) == rl
    assert store(db) == before

    # a deleted step: stopped before any job, the evaluation never sees the shorter list
    shutil.rmtree(rl / f"step={steps[0]}")
    failed = run(done)
    assert advice(failed) == rl
    assert store(db) == before

    shutil.rmtree(rl)                               # the advice
    again = run(done)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert re.search(r"^(local)?rule rl:", again.stdout + again.stderr, re.MULTILINE)
    assert manifest.steps(rl) == steps and set(manifest.verify_set(rl)) == set(steps)
    assert curve(db) == done["curve"]


def ran(proc) -> set[str]:
    """The rules a run executed."""
    out = proc.stdout + proc.stderr
    return {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}


def test_a_changed_kl_value_replaces_its_cell_in_store_summary_figures_and_findings(done, tmp_path):
    """It changes the grid (PPO at KL 0 -> 0.05, and a GRPO cell): on a copy of the finished study, so that
    the other tests of this module find the study as the fixture left it, in whatever order they run."""
    root = tmp_path / "study"
    shutil.copytree(done["root"], root)             # file times kept: nothing is out of date in the copy
    res = root / "results"
    db = res / done["db"].relative_to(done["results"])
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT DISTINCT algo, kl FROM cells WHERE kind = 'rl'").fetchall() == [("ppo", 0.0)]
        base_rows = con.execute("SELECT * FROM evals WHERE algo = 'base' ORDER BY ALL").df()
    old_cell = res / done["rl"].parent.relative_to(done["results"])
    cfg = yaml.safe_load(done["config"].read_text())
    cfg["results"] = str(res)
    cfg["grid"]["algos"] = {"ppo": {"kl": [0.05]}, "grpo": {"kl": [0.0]}}
    edited = root / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg, sort_keys=False))
    second = snakemake("--cores", "2", f"--configfile={edited}", cwd=root)
    assert {"rl", "eval_rl", "ingest", "report"} <= ran(second)
    assert not ran(second) & {"pretrain", "eval_base", "tokenizer", "make_source"}, ran(second)

    assert (old_cell / "steps.parquet").exists(), "the old cell's files stay on disk"
    with duckdb.connect(str(db), read_only=True) as con:
        for table in ("cells", "rl_steps", "evals"):
            kls = {kl for (kl,) in con.execute(f"SELECT DISTINCT kl FROM {table} WHERE algo = 'ppo'").fetchall()}
            assert kls == {0.05}, (table, kls)
        # where each trained cell of the grid ran, from the machine.json its job wrote
        assert con.execute("SELECT algo, kl FROM machines ORDER BY ALL").fetchall() == [
            ("base", 0.0), ("grpo", 0.0), ("ppo", 0.05)]
        pd.testing.assert_frame_equal(con.execute("SELECT * FROM evals WHERE algo = 'base' ORDER BY ALL").df(),
                                      base_rows)
    summary = (res / "summary.txt").read_text()
    assert "ppo · KL 0.05" in summary and "ppo · KL 0 " not in summary
    figures = sorted(p.name for p in (res / "figures").glob("fig1_*.png"))
    assert any(f.endswith("ppo_kl0.05.png") for f in figures) and not any(f.endswith("ppo_kl0.png") for f in figures)
    # F1 judges the PPO/GRPO cells at KL 0: only the GRPO one is in the grid now
    f1 = pd.read_csv(res / "findings.tsv", sep="\t").set_index("finding").loc["F1", "numbers"]
    assert f1.split("; ")[1].endswith("/1 cells"), f1      # after the count of seeds
