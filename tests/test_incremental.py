"""Incremental reruns through the real Snakefile: each edit schedules exactly the jobs it should.

Running the workflow for real takes minutes (pretraining, RL), so the module makes every output of a tiny
grid exist without computing it: it creates each output the DAG lists (`--summary`) as an empty file or
folder, then runs `--touch --forceall`, which touches them in DAG order AND records Snakemake's metadata
(params, input lists, input checksums) as a real run does, so the params and input rerun triggers of
profiles/default are live. Then each case is one dry run (`-n`) whose scheduled jobs are parsed.

The workflow runs from a copy of the repository in a temporary folder, so code edits never touch the real
tree; every edit is undone (content and mtime) when its test ends.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, SNAKEMAKE, tiny_config, write_config
from echochamber import manifest

NEW_MIXTURE = "as_fm3_2xtg"


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if listed.returncode != 0:      # not a git checkout (e.g. an unpacked archive): all but build outputs
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "results", ".snakemake", "__pycache__", "*.egg-info", ".pytest_cache"))
        return dest
    for rel in filter(None, listed.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run(ws, *args, config=None):
    """The copied repository's workflow on a config (the module's base config by default)."""
    cmd = [SNAKEMAKE, "-s", str(ws["repo"] / "Snakefile"), "-d", str(ws["root"]),
           f"--configfile={config or ws['config']}", *args]
    proc = subprocess.run(cmd, cwd=ws["root"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def scheduled(text: str) -> list[tuple[str, dict]]:
    """The jobs of a dry run's log as (rule, wildcards); checked against its "Job stats" table."""
    jobs = []
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append((m.group(1), {}))
        elif (m := re.match(r"^\s+wildcards: (.+)$", line)) and jobs:
            jobs[-1][1].update(kv.split("=", 1) for kv in m.group(1).split(", "))
    stats = {}
    if "Job stats:" in text:
        table = text.split("Job stats:", 1)[1].splitlines()
        for line in table[3:]:
            name, count = line.split()
            if name == "total":
                break
            stats[name] = int(count)
    assert stats == dict(Counter(r for r, _ in jobs)), f"could not parse the dry run:\n{text[-3000:]}"
    return jobs


def dry_run(ws, config=None) -> list[tuple[str, dict]]:
    return scheduled(run(ws, "-n", config=config))


def counts(jobs) -> dict[str, int]:
    return dict(Counter(rule for rule, _ in jobs))


def variant(ws, name: str, edit) -> Path:
    """A config file next to the base one: the base config changed by ``edit(cfg)``."""
    cfg = copy.deepcopy(ws["cfg"])
    edit(cfg)
    return write_config(ws["root"] / f"{name}.yaml", cfg)


@contextlib.contextmanager
def edited(path: Path, text: str):
    """Append ``text`` to a file for the duration; then restore its content and mtime."""
    before, stat = path.read_bytes(), path.stat()
    try:
        with path.open("a") as f:
            f.write(text)
        yield path
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A copied repository and a tiny grid (one mixture, PPO and GRPO) whose every output exists."""
    root = tmp_path_factory.mktemp("incremental")
    repo = copy_repo(root / "repo")
    cfg = tiny_config(root / "results")
    cfg["grid"]["algos"] = {"ppo": {"kl": [0.0]}, "grpo": {"kl": [0.0]}}
    ws = {"root": root, "repo": repo, "cfg": cfg, "config": write_config(root / "config.yaml", cfg)}

    # Every output of the DAG, as an empty file, or a folder for the directory() outputs (the workflow's
    # only output without a file suffix: figures/), except the checkpoint manifests, which the workflow
    # checks before any job: a real one over an empty model/ folder or over one empty checkpoint.
    results = str(cfg["results"])
    outputs = [line.split("\t")[0] for line in run(ws, "--summary").splitlines()
               if line.startswith(results + "/")]
    assert any(o.endswith("/model/manifest.json") for o in outputs) and any(o.endswith("/echo.duckdb") for o in outputs)
    for out in map(Path, outputs):
        if out.name == "manifest.json" and out.parent.name == "checkpoints":
            (out.parent / "step=1").mkdir(parents=True, exist_ok=True)
            manifest.write(out.parent / "step=1")
            manifest.write_set(out.parent, [1])
        elif out.name == "manifest.json" and out.parent.name == "model":
            out.parent.mkdir(parents=True, exist_ok=True)
            manifest.write(out.parent)
        elif out.suffix:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()
        else:
            out.mkdir(parents=True, exist_ok=True)
    touched = run(ws, "--touch", "--forceall", "--cores", "1")
    assert "not touched" not in touched, touched[-3000:]
    return ws


def test_nothing_changed_schedules_nothing(ws):
    out = run(ws, "-n")
    assert "Nothing to be done" in out, out[-3000:]
    # the touch run recorded metadata for every job, so params changes are detectable below
    assert "missing provenance" not in out, out[-3000:]


def test_new_kl_coefficient_schedules_only_its_cell(ws):
    def more_kl(cfg):
        cfg["grid"]["algos"]["ppo"]["kl"] = [0.0, 0.01]

    jobs = dry_run(ws, variant(ws, "kl", more_kl))
    assert counts(jobs) == {"rl": 1, "eval_rl": 2, "ingest": 1, "report": 1, "all": 1}
    for rule, w in jobs:
        if rule in ("rl", "eval_rl"):
            assert (w["algo"], w["kl"]) == ("ppo", "0.01")


def test_changed_algorithm_setting_reruns_only_its_cells(ws):
    """Params trigger: a GRPO-only setting changes the GRPO cell's params, not PPO's nor pretraining's."""
    def grpo_eps(cfg):
        cfg["rl"]["grpo"]["std_eps"] = 1.0e-6

    jobs = dry_run(ws, variant(ws, "grpo", grpo_eps))
    assert counts(jobs) == {"rl": 1, "eval_rl": 2, "ingest": 1, "report": 1, "all": 1}
    assert {w["algo"] for rule, w in jobs if rule in ("rl", "eval_rl")} == {"grpo"}


def test_new_mixture_schedules_only_its_cells(ws):
    def add_mixture(cfg):
        cfg["mixtures"][NEW_MIXTURE] = {"as": 1, "fm3": 1, "tg": 2}
        cfg["grid"]["mixtures"].append(NEW_MIXTURE)

    jobs = dry_run(ws, variant(ws, "mixture", add_mixture))
    # its mixture and model, the model's 2 evaluations, PPO and GRPO on it and theirs; no data, no tokenizer
    assert counts(jobs) == {"mixture": 1, "pretrain": 1, "eval_base": 2, "rl": 2, "eval_rl": 4,
                            "ingest": 1, "report": 1, "all": 1}
    assert {w["mixture"] for _, w in jobs if "mixture" in w} == {NEW_MIXTURE}


def test_unrelated_file_edits_invalidate_nothing(ws):
    repo = ws["repo"]
    with edited(repo / "README.md", "\nA note.\n"), edited(repo / "tests" / "conftest.py", "\n# a note\n"), \
            edited(repo / "Makefile", "\n# a note\n"):
        out = run(ws, "-n")
    assert "Nothing to be done" in out, out[-3000:]


def test_rl_code_edit_reruns_its_rl_cells_not_pretraining(ws):
    with edited(ws["repo"] / "src" / "echochamber" / "rl" / "ppo.py", "\n# a comment\n"):
        jobs = dry_run(ws)
    assert counts(jobs) == {"rl": 1, "eval_rl": 2, "ingest": 1, "report": 1, "all": 1}
    assert {w["algo"] for rule, w in jobs if rule in ("rl", "eval_rl")} == {"ppo"}

    # a module every algorithm shares reruns every RL cell
    with edited(ws["repo"] / "src" / "echochamber" / "rl" / "losses.py", "\n# a comment\n"):
        jobs = dry_run(ws)
    assert counts(jobs) == {"rl": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}

    # The reward's sandbox and the rollout engine are packages: any of their modules reruns RL and every
    # evaluation, no pretraining.
    for module in ("sandbox/confinement.py", "rollout/engine.py"):
        with edited(ws["repo"] / "src" / "echochamber" / module, "\n# a comment\n"):
            jobs = dry_run(ws)
        assert counts(jobs) == {"rl": 2, "eval_base": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}, module


@contextlib.contextmanager
def replaced(path: Path, old: str, new: str):
    """Replace ``old`` by ``new`` in a file for the duration; then restore its content and mtime."""
    before, stat = path.read_bytes(), path.stat()
    text = before.decode()
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    try:
        path.write_text(text.replace(old, new))
        yield path
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


DOWNSTREAM_OF_PRETRAIN = {"pretrain": 1, "eval_base": 2, "rl": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}


@pytest.mark.parametrize("script, expected", [
    ("make_report.py", {"report": 1, "all": 1}),
    ("ingest.py", {"ingest": 1, "report": 1, "all": 1}),
    ("evaluate_cell.py", {"eval_base": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}),
    ("pretrain.py", DOWNSTREAM_OF_PRETRAIN),
    ("make_mixture.py", {"mixture": 1, **DOWNSTREAM_OF_PRETRAIN}),
])
def test_a_workflow_script_edit_reruns_its_rule(ws, script, expected):
    with edited(ws["repo"] / "workflow_scripts" / script, "\n# a comment\n"):
        jobs = dry_run(ws)
    assert counts(jobs) == expected


def test_a_shell_command_edit_reruns_its_rule(ws):
    """The code trigger of the profiles: the pretrain rule's command changed, so its cell reruns."""
    with replaced(ws["repo"] / "rules" / "pretrain.smk", '--out {params.cell}', '--out  {params.cell}'):
        jobs = dry_run(ws)
    assert counts(jobs) == DOWNSTREAM_OF_PRETRAIN


# A new value for every runtime setting (echochamber.settings marks them); the test fails when a setting is
# marked runtime without a value here.
RUNTIME_EDITS = {
    "pretrain": {"micro_batch_size": 4, "save_every": 7, "processes": 2, "gpus": 1, "threads": 2,
                 "per_scale": {"xs": {"micro_batch_size": 2}}},
    # rl.gpus 1 = the configured 1 process (processes is identity)
    "rl": {"samples_logged": 5, "save_every": 3, "gpus": 1, "threads": 2},
    "eval": {"keep_samples": 1},
}


@pytest.mark.parametrize("section", sorted(RUNTIME_EDITS))
def test_runtime_settings_rerun_nothing(ws, section):
    """How a job runs (threads, processes, devices, micro-batches of the same batch, save and log cadence) is
    not what it computes: editing every runtime setting of a section reruns no job."""
    from echochamber import settings

    model = {"pretrain": settings.Pretrain, "rl": settings.RL, "eval": settings.Eval}[section]
    assert set(RUNTIME_EDITS[section]) == set(settings.runtime_keys(model))
    for key, value in RUNTIME_EDITS[section].items():
        assert ws["cfg"][section].get(key) != value, key
    edited = variant(ws, f"runtime_{section}", lambda cfg: cfg[section].update(RUNTIME_EDITS[section]))
    out = run(ws, "-n", config=edited)
    assert "Nothing to be done" in out, out[-3000:]


def test_an_identity_setting_reruns(ws):
    """The counterpart: RL's micro-batch size changes the numbers (loss_agg microbatch_token_mean), so it reruns."""
    jobs = dry_run(ws, variant(ws, "rl_micro", lambda cfg: cfg["rl"].update(micro_batch_size=2)))
    assert counts(jobs).get("rl") == 2, jobs


STAGE_EDITS = {
    # an evaluation setting: every evaluation, no training
    "eval": (lambda cfg: cfg["eval"].update(max_new_tokens=12),
             {"eval_base": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}),
    # a pretraining setting: the model and everything after it, not the data or the tokenizer
    "pretrain": (lambda cfg: cfg["pretrain"].update(lr=1.0e-3),
                 {"pretrain": 1, "eval_base": 2, "rl": 2, "eval_rl": 4, "ingest": 1, "report": 1, "all": 1}),
    # an Expert Iteration setting, in a grid without an EI cell: nothing
    "ei": (lambda cfg: cfg["rl"]["ei"].update(rounds=5), {}),
}


@pytest.mark.parametrize("stage", sorted(STAGE_EDITS))
def test_a_stage_setting_reruns_only_what_depends_on_it(ws, stage):
    edit, expected = STAGE_EDITS[stage]
    assert counts(dry_run(ws, variant(ws, f"stage_{stage}", edit))) == expected
