"""The whole tiny workflow for real, then a changed KL value: its cell replaces the old one everywhere users look.

The old cell's files stay on disk (nothing is deleted behind the user's back), but the store, the summary,
the findings and the figures describe the grid as it is now; pretraining is not redone.
"""

from __future__ import annotations

import copy

import duckdb
import pandas as pd

from conftest import snakemake, write_config

OLD_KL, NEW_KL = 0.0, 0.05


def ran(proc) -> set[str]:
    """The rules a run executed."""
    out = proc.stdout + proc.stderr
    return {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}


def test_changed_kl_value_replaces_its_cell_in_store_summary_and_figures(tiny, tmp_path):
    path, cfg = tiny
    res = tmp_path / "results"
    cfg["grid"]["algos"] = {"ppo": {"kl": [OLD_KL]}, "grpo": {"kl": [0.0]}}
    write_config(path, cfg)
    snakemake("--cores", "2", f"--configfile={path}", cwd=tmp_path)
    with duckdb.connect(str(res / "echo.duckdb"), read_only=True) as db:
        before = db.execute("SELECT algo, kl FROM cells WHERE kind = 'rl' ORDER BY algo").fetchall()
        grpo_rows = db.execute("SELECT * FROM rl_steps WHERE algo = 'grpo' ORDER BY step").df()
    assert before == [("grpo", 0.0), ("ppo", OLD_KL)]
    old_cell = res / f"rl/mixture={cfg['grid']['mixtures'][0]}/scale=xs/algo=ppo/kl=0/seed=0"
    assert (old_cell / "steps.parquet").exists()

    edited = copy.deepcopy(cfg)
    edited["grid"]["algos"]["ppo"]["kl"] = [NEW_KL]
    write_config(path, edited)
    second = snakemake("--cores", "2", f"--configfile={path}", cwd=tmp_path)
    assert {"rl", "ingest", "report"} <= ran(second)
    assert not ran(second) & {"pretrain", "tokenizer", "make_source", "tokenize_source"}, ran(second)

    assert (old_cell / "steps.parquet").exists(), "the old cell's files stay on disk"
    with duckdb.connect(str(res / "echo.duckdb"), read_only=True) as db:
        for table in ("cells", "rl_steps", "evals"):
            kls = {kl for (kl,) in db.execute(f"SELECT DISTINCT kl FROM {table} WHERE algo = 'ppo'").fetchall()}
            assert kls == {NEW_KL}, (table, kls)
        # the untouched GRPO cell is the same data, not recomputed
        pd.testing.assert_frame_equal(db.execute("SELECT * FROM rl_steps WHERE algo = 'grpo' ORDER BY step").df(),
                                      grpo_rows)
    summary = (res / "summary.txt").read_text()
    assert f"ppo · KL {NEW_KL:g}" in summary and f"ppo · KL {OLD_KL:g} " not in summary
    figures = sorted(p.name for p in (res / "figures").glob("fig1_*.png"))
    assert any(f"ppo_kl{NEW_KL:g}.png" in f for f in figures) and not any("ppo_kl0.png" in f for f in figures)
    # F1 judges the PPO/GRPO cells at KL 0: only GRPO's is left
    f1 = pd.read_csv(res / "findings.tsv", sep="\t").set_index("finding").loc["F1", "numbers"]
    assert f1.split(";")[0].endswith("/1 cells"), f1
