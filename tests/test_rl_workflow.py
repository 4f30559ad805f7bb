"""The `rl` rule end to end: accelerate launch on CPU over the grid's cells, and params that rerun only what changed."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from echochamber import models as ec_models
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer
from echochamber.formats import document

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
MIX, SCALE = "as_fm3_tg_omi1_omi2", "xs"

SNAKEFILE = f"""
configfile: "config.yaml"
include: "{ROOT}/rules/common.smk"
include: "{ROOT}/rules/rl.smk"
rule all:
    input: rl_outputs()
"""


def tiny_rl_config(results: Path) -> dict:
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))
    cfg["results"] = str(results)
    cfg["grid"].update(mixtures=[MIX], scales=[SCALE], seeds=[0], algos={"ppo": {"kl": [0]}, "grpo": {"kl": [0.01]}})
    cfg["rl"].update(rollout_batch_size=4, samples_per_prompt=2, train_batch_size=8, micro_batch_size=8,
                     max_new_tokens=10, max_steps=2, n_checkpoints=1, samples_logged=4, processes=1, threads=1)
    return cfg


@pytest.fixture
def workdir(tmp_path):
    """A working folder with a Snakefile of the data-free RL stage, a base checkpoint and prompts."""
    # a snapshot of the sources the rule lists as inputs (others may edit the live tree meanwhile)
    shutil.copytree(ROOT / "src" / "echochamber", tmp_path / "src" / "echochamber",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "workflow_scripts", tmp_path / "workflow_scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    results = tmp_path / "results"
    cfg = tiny_rl_config(results)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    diff = synthetic.Difficulty()
    docs = [document(r["question"], r["solution"]) for r in synthetic.generate("tg", "tinygsm", "train", 30, seed=0,
                                                                                difficulty=diff)]
    tok = ec_tokenizer.train_bpe(docs, 300)
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, bos_token_id=None))
    ec_models.save_checkpoint(model, tok, results / f"pretrain/mixture={MIX}/scale={SCALE}/seed=0/model")
    prompts = results / "data/source=gsm8k/train.parquet"
    prompts.parent.mkdir(parents=True)
    synthetic.write_parquet(synthetic.generate("gsm8k", "gsm8k", "train", 12, seed=0, difficulty=diff), prompts)
    return tmp_path, cfg


def smk(workdir: Path, *args, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([SNAKEMAKE, "-s", str(workdir / "Snakefile"), "-d", str(workdir), "--cores", "1", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned(proc) -> str:
    """The job blocks of rule `rl` in a dry run's output."""
    blocks = (proc.stdout + proc.stderr).split("\nrule ")
    return "\n".join(b for b in blocks if b.startswith("rl:"))


def test_rl_rule_runs_every_cell_and_reruns_only_what_changed(workdir):
    wd, cfg = workdir
    smk(wd)
    results = wd / "results"
    for cell in ("algo=ppo/kl=0", "algo=grpo/kl=0.01"):
        out = results / f"rl/mixture={MIX}/scale={SCALE}/{cell}/seed=0"
        steps = pd.read_parquet(out / "steps.parquet")
        assert steps.step.tolist() == [1, 2]
        assert (steps.share_tinygsm + steps.share_omi1 + steps.share_text).round(6).eq(1).all()
        assert len(pd.read_parquet(out / "samples.parquet")) == 8
        assert sorted(p.name for p in (out / "checkpoints").glob("step=*")) == ["step=1", "step=2"]
        log = (results / f"logs/rl/mixture={MIX}/scale={SCALE}/{cell}/seed=0.log").read_text()
        assert "step 2/2" in log and "rl done" in log
        assert (results / f"benchmarks/rl/mixture={MIX}/scale={SCALE}/{cell}/seed=0.tsv").exists()
    again = smk(wd, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr and not planned(again)

    # a GRPO setting reruns the GRPO cell only
    edited = copy.deepcopy(cfg)
    edited["rl"]["grpo"] = {**edited["rl"].get("grpo", {}), "epochs": 2}
    (wd / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    plan = planned(smk(wd, "-n"))
    assert "algo=grpo/kl=0.01" in plan and "algo=ppo" not in plan

    # a new KL coefficient adds its cell and touches no other
    edited = copy.deepcopy(cfg)
    edited["grid"]["algos"]["ppo"]["kl"] = [0, 0.001]
    (wd / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    plan = planned(smk(wd, "-n"))
    assert "algo=ppo/kl=0.001" in plan and "algo=ppo/kl=0/" not in plan and "algo=grpo" not in plan


def descendants(pid: int) -> list[int]:
    """Ids of the processes below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_a_killed_rl_job_is_retried_and_resumes(workdir):
    """SIGKILL the job's processes mid-run (as a node failure or preemption would); Snakemake removes the
    job's declared outputs, checkpoints/ among them, and retries it (the Slurm profile's `retries: 1`), and
    the retried job resumes from resume/."""
    wd, cfg = workdir
    cfg = copy.deepcopy(cfg)
    cfg["grid"]["algos"] = {"ppo": {"kl": [0]}}
    cfg["rl"].update(max_steps=4, save_every=1)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cell = f"mixture={MIX}/scale={SCALE}/algo=ppo/kl=0/seed=0"
    out, log = wd / "results" / "rl" / cell, wd / "results" / "logs" / "rl" / f"{cell}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with (wd / "snakemake.log").open("w") as sm_log:
        cmd = [SNAKEMAKE, "-s", str(wd / "Snakefile"), "-d", str(wd), "--cores", "1", "--retries", "1"]
        proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=sm_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (log.exists() and "saved the resume state at step 2" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (wd / "snakemake.log").read_text()[-3000:]
        time.sleep(0.01)
    job = descendants(proc.pid)
    assert job, "the job has no process"
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.wait(600) == 0, (wd / "snakemake.log").read_text()[-3000:]
    assert "Trying to restart job" in (wd / "snakemake.log").read_text()

    text = log.read_text()                                  # the retry's log
    assert f"resuming from {out / 'resume'} at step " in text and "step 1/4" not in text and "step 4/4" in text
    assert pd.read_parquet(out / "steps.parquet").step.tolist() == [1, 2, 3, 4]
    # step=1 was written before the kill only (resume/ keeps it too, for executors that remove checkpoints/)
    assert sorted(p.name for p in (out / "checkpoints").glob("step=*")) == ["step=1", "step=3", "step=4"]
    assert not (out / "resume").exists()


def test_a_config_mistake_stops_before_any_job(workdir):
    wd, cfg = workdir
    bad = copy.deepcopy(cfg)
    bad["grid"]["algos"]["ei"] = {"kl": [0.01]}
    (wd / "config.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    proc = smk(wd, "-n", check=False)
    assert proc.returncode != 0
    assert "grid.algos.ei.kl: Expert Iteration has no KL term" in proc.stderr
    assert "Traceback" not in proc.stderr
