"""Shared fixtures: the repository root and a tiny workflow config derived from config.yaml."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


# The longest test files first (seconds summed over their tests in one two-worker run on a busy 2-vCPU
# Zen 3, 2026-12-07; a renamed file here only loses its place in the order):
# test_config 439, test_incremental 318, test_study_faults 277, test_slurm 272, test_rl_workflow 130,
# test_evaluate 111. `make test` hands whole files to two xdist workers in collection order
# (--no-loadscope-reorder), so the short files fill in around these; xdist's own order (most tests first)
# left the few-test end-to-end files to the end, one worker idle for minutes.
LONGEST_FILES = ("test_config.py", "test_incremental.py", "test_study_faults.py", "test_slurm.py",
                 "test_rl_workflow.py", "test_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order


def tiny_config(results: Path) -> dict:
    """config.yaml shrunk to seconds: few problems, the smallest scale, a few steps of each stage."""
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))
    cfg["results"] = str(results)
    syn = cfg["data"]["synthetic"]
    syn.update(n_train=120, n_test=12, n_hard=12)
    for spec in cfg["data"]["sources"].values():
        for key in ("n_train", "n_test", "n_hard"):
            spec.pop(key, None)
    cfg["tokenizer"]["vocab_size"] = 400
    cfg["pretrain"].update(seq_len=64, batch_size=8, micro_batch_size=8, max_steps=4, warmup_steps=1,
                           save_every=2, threads=1)
    cfg["rl"].update(rollout_batch_size=2, samples_per_prompt=2, train_batch_size=4, micro_batch_size=4,
                     max_new_tokens=16, max_steps=2, n_checkpoints=1, samples_logged=4, threads=1)
    cfg["rl"]["ei"].update(rounds=1, samples_per_prompt=2, batch_size=4)
    cfg["eval"].update(max_problems=4, n_samples=2, k=2, max_new_tokens=16, batch_size=8)
    cfg["grid"].update(mixtures=cfg["grid"]["mixtures"][:1], scales=["xs"], seeds=[0],
                       algos={"ppo": {"kl": [0.0]}}, exclude=[])
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(*args, cwd=ROOT, check=True, timeout=900):
    """Run the real workflow (the repository's Snakefile) and return the completed process."""
    cmd = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(cwd), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def tiny(tmp_path):
    """A tiny config file in a fresh working directory, and that directory."""
    cfg = tiny_config(tmp_path / "results")
    return write_config(tmp_path / "config.yaml", cfg), cfg


# --- Slurm: a one-node cluster for tests/test_slurm.py ------------------------------------------------
import shutil  # noqa: E402


def _slurm_ready() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm (.ci/slurm-up.sh starts one as root); skipped where it cannot start, failed if CI=true."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")

    def unavailable(reason: str):
        (pytest.fail if in_ci else pytest.skip)(f"Slurm unavailable: {reason}")

    sudo = (os.geteuid() != 0 and shutil.which("sudo")
            and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0)
    if os.geteuid() != 0 and not sudo:
        if not _slurm_ready():
            unavailable("not root (nor password-less sudo), so .ci/slurm-up.sh cannot start slurm-wlm and munge")
        return
    try:
        up = subprocess.run(["bash", str(ROOT / ".ci" / "slurm-up.sh")], capture_output=True, text=True,
                            timeout=900)
    except subprocess.TimeoutExpired:
        unavailable(".ci/slurm-up.sh did not finish within 15 minutes")
    if up.returncode != 0 or not _slurm_ready():
        unavailable(f".ci/slurm-up.sh failed ({up.returncode}): {(up.stderr or up.stdout).strip()[-500:]}")
