"""The grid at cluster scale: the Slurm profile, the paper's config, and a real one-node Slurm run."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import ROOT, snakemake, tiny_config, write_config
from echochamber import config as ec_config
from echochamber import grid

PROFILE = ROOT / "profiles" / "slurm"
PAPER = ROOT / "configs" / "paper.yaml"


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def test_slurm_profile_leaves_cluster_choices_to_the_user_and_gives_gpu_jobs_one_task():
    p = profile()
    assert p["executor"] == "slurm" and p["retries"] >= 1 and p["latency-wait"] >= 30
    # partition and account are the user's (commented in the file), never a made-up value
    assert "slurm_partition" not in p["default-resources"] and "slurm_account" not in p["default-resources"]
    text = (PROFILE / "config.yaml").read_text()
    assert re.search(r"#\s*slurm_partition:", text) and re.search(r"#\s*slurm_account:", text)
    gpu_rules = {rule for rule, res in p["set-resources"].items() if res.get("gpu")} | {"pretrain", "rl"}
    assert "gpu" not in p["set-resources"]["pretrain"] and "gpu" not in p["set-resources"]["rl"]  # config's
    for rule in gpu_rules:
        res = p["set-resources"][rule]
        # one task per job: accelerate spawns the ranks (`tasks` would become --ntasks-per-gpu)
        assert not {"tasks", "tasks_per_gpu", "mpi"} & set(res), rule
        assert {"cpus_per_task", "mem_mb", "runtime"} <= set(res), rule


def test_paper_config_is_complete_and_replaces_the_embedded_default(tmp_path):
    cfg = ec_config.load(PAPER)
    assert set(cfg["grid"]["scales"]) == {"150M", "1B"}
    assert {a: s["kl"] for a, s in cfg["grid"]["algos"].items()} == {
        "ppo": [0.0, 0.001, 0.01], "grpo": [0.0, 0.001, 0.01], "ei": [0.0]}
    assert all(s["kind"] == "hub" for s in cfg["data"]["sources"].values())
    assert cfg["tokenizer"] == {"kind": "pretrained", "name": "meta-llama/Llama-2-7b-hf"}
    assert cfg["mixtures"]["as_fm3_tg_8xomi1"] == {"as": 1, "fm3": 1, "tg": 1, "omi1": 8}
    # Through Snakemake, with the Slurm profile: config.yaml's synthetic sources must not leak in (a
    # merged `fm3` would be {kind: hub, render: ...} and fail validation) and the DAG reads the paper's.
    dry = snakemake("-n", "--profile", str(PROFILE), "--configfile", str(PAPER),
                    "--config", f"results={tmp_path / 'results'}", cwd=tmp_path)
    out = dry.stdout + dry.stderr
    assert set(re.findall(r"source=(\w+)/train\.parquet", out)) == set(grid.sources_needed(cfg))
    # each job's block on its own (a pattern over the whole plan would backtrack through every job)
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", out)
    # each pretraining job asks Slurm for its scale's GPUs and launches one process per GPU
    jobs = [tuple(re.search(p, b).group(1) for p in (r"scale=(\w+)", r"gpu=(\d+)", r"--num_processes (\d+)",
                                                      r"--micro-batch-size (\d+)"))
            for b in blocks if b.startswith("rule pretrain:")]
    assert len(jobs) == 22
    assert set(jobs) == {("150M", "4", "4", "16"), ("1B", "8", "8", "8")}
    blocks = [b for b in blocks if b.startswith("rule rl:")]
    rl = [(re.search(r"gpu=(\d+)", b).group(1), re.search(r"echochamber\.launch --processes (\d+)", b).group(1))
          for b in blocks]
    assert len(rl) == 154 and set(rl) == {("4", "4")}


def _test_cluster_overrides(p: dict) -> list[str]:
    """Only what a 2-CPU test node without GPUs or accounting needs changed in the Slurm profile."""
    small = {"gpu": 0, "cpus_per_task": 1, "mem_mb": 1000, "runtime": 30}
    sets = [f"{rule}:{key}={small[key]}" for rule, res in p.get("set-resources", {}).items()
            for key in res if key in small]
    return ["--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
            "--default-resources", "mem_mb=1000", "runtime=30", "cpus_per_task=1",
            "--set-resources", *sets,
            "--latency-wait", "10", "--retries", "0", "--jobs", "10", "--verbose"]


@pytest.mark.slow
def test_tiny_workflow_runs_end_to_end_through_slurm(slurm_cluster, tmp_path):
    """The default target of a tiny config, every job an sbatch job on the one-node cluster."""
    results = tmp_path / "results"
    path = write_config(tmp_path / "config.yaml", tiny_config(results))
    proc = snakemake("--profile", str(PROFILE), "--configfile", str(path), *_test_cluster_overrides(profile()),
                     cwd=tmp_path, check=False, timeout=1500)
    log = proc.stdout + proc.stderr
    (tmp_path / "snakemake.log").write_text(log)
    assert proc.returncode == 0, f"Slurm run failed; log in {tmp_path / 'snakemake.log'}:\n{log[-5000:]}"

    # every job went through sbatch, and Slurm itself says each one completed
    assert "sbatch call: sbatch" in log
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    finished = set(re.findall(r"Finished jobid: (\d+)", log)) | set(re.findall(r"Finished job (\d+)\.", log))
    assert submitted, log[-3000:]
    assert {job for job, _ in submitted} <= finished
    for _, slurm_id in submitted:
        state = subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True).stdout
        assert "JobState=COMPLETED" in state, state

    # everything the default target wants now exists: a second dry run has nothing to do
    again = snakemake("-n", "--profile", str(PROFILE), "--configfile", str(path),
                      *_test_cluster_overrides(profile()), cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert (results / "tokenizer" / "tokenizer_config.json").exists()
    if "rules/results.smk" in (ROOT / "Snakefile").read_text():
        import duckdb

        with duckdb.connect(str(results / "echo.duckdb"), read_only=True) as db:
            tables = [t for (t,) in db.execute("SHOW TABLES").fetchall()]
            assert tables and sum(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables) > 0
