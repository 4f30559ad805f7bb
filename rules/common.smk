# Config validation, the grid, paths and every helper the rule files use (rule files hold only rules).
import json
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from echochamber import base_models as ec_base
from echochamber import config as ec_config
from echochamber import evaluate as ec_eval
from echochamber import grid as ec_grid
from echochamber import launch as ec_launch
from echochamber import manifest as ec_manifest
from echochamber import pretrain as ec_pretrain
from echochamber import timing as ec_timing
from echochamber.data.sources import source_spec
from echochamber.rl import settings as rl_settings

CONFIG_ORIGIN = ", ".join(map(str, workflow.overwrite_configfiles)) or "config.yaml"
try:
    ec_config.validate(config, origin=CONFIG_ORIGIN)  # the same checks as `echochamber validate`
except ec_config.ConfigError as e:
    sys.exit(f"Config error: {e}")

R = config["results"]
# Library sources a rule's results depend on: editing them reruns that stage (see rules' inputs).
SRC = Path(workflow.basedir) / "src" / "echochamber"
# Rules list their workflow script among their inputs too, so editing a script reruns that rule's jobs.
SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
# Jobs may run in the conda env of envs/ (--sdm conda), which holds the dependencies, not the package.
# (found beside the package, so a Snakefile symlinked elsewhere still finds it)
CONDA_ENV = str(Path(ec_config.__file__).resolve().parents[2] / "envs" / "echochamber.yaml")
# Every job's command (shell and script rules, local or on a cluster node) imports the package from this
# checkout's src/, and its `python` is the interpreter running Snakemake (the venv's) unless the job runs in
# the conda env (--sdm conda), whose python comes first. Set in the command, not in Snakemake's environment,
# so conda jobs keep it too (Snakemake drops PYTHONPATH from theirs); `set -euo pipefail` is the default.
JOB_PREFIX = f"set -euo pipefail; export PYTHONPATH={shlex.quote(str(SRC.parent))}${{PYTHONPATH:+:$PYTHONPATH}}; "
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    JOB_PREFIX += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(JOB_PREFIX.replace("{", "{{").replace("}", "}}"))  # formatted like a command: braces are literal


wildcard_constraints:
    source=r"[A-Za-z0-9]+",
    split="train|test|hard",
    mixture=r"[A-Za-z0-9_.]+",
    scale=r"[A-Za-z0-9.]+",
    algo="|".join(ec_grid.ALGOS),
    kl=r"[0-9.e+-]+",
    seed=r"\d+",
    benchmark=r"[A-Za-z0-9_]+",


def data_outputs():
    # a mixture whose every cell starts from a released checkpoint (base_models) needs none of its data
    return expand(
        f"{R}/data/source={{source}}/{{split}}.parquet", source=ec_base.sources_needed(config), split=ec_grid.SPLITS
    )


def tokenizer_outputs():
    # base models bring their own tokenizer; ours is built only when some cell is pretrained
    return [f"{R}/tokenizer/tokenizer_config.json"] if ec_base.needs_tokenizer(config) else []


def warn_if_grid_too_large():
    """Before the first job: one line when the grid is too large for the local executor."""
    if message := ec_grid.size_warning(config, local=workflow.local_exec):
        print(message, file=sys.stderr)


def final_message():
    """What `make run` prints at the end: the study's summary and where the results are."""
    summary = Path(f"{R}/summary.txt")
    lines = ["", summary.read_text().rstrip()] if summary.exists() else []
    lines += ["", f"Results are under {R}/:"]
    for what, path in [
        ("data (one folder per source)", f"{R}/data"),
        ("tokenizer", f"{R}/tokenizer"),
        ("pretrained models", f"{R}/pretrain"),
        ("RL runs", f"{R}/rl"),
        ("evaluations", f"{R}/eval"),
        ("results store (query with `echochamber sql`)", f"{R}/echo.duckdb"),
        ("report", f"{R}/report.html"),
    ]:
        if Path(path).exists():
            lines.append(f"  {what:<48} {path}")
    breakdown = ec_timing.report(f"{R}/benchmarks")
    return "\n".join(lines + (["", breakdown] if breakdown else []))


# --- pretrain ---------------------------------------------------------------------------------

PRETRAIN_CELL = f"{R}/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}"


def pretrain_outputs():
    """Every pretrain cell's checkpoint (its manifest) and loss curve (for rule all)."""
    cells = ec_grid.pretrain_cells(config)
    return [f"{R}/pretrain/{c.id}/model/manifest.json" for c in cells] + [
        f"{R}/pretrain/{c.id}/curve.parquet" for c in cells
    ]


# --- base_models ------------------------------------------------------------------------------

BASE_MODEL_CELLS = ec_base.cells(config)


# --- rl ---------------------------------------------------------------------------------------

RL_CELLS = {c.id: c for c in ec_grid.rl_cells(config)}
RL_CELL = "mixture={mixture}/scale={scale}/algo={algo}/kl={kl}/seed={seed}"
# Every module of the sandbox package, where the reward runs model-written code (RL and evaluation jobs).
SANDBOX_SRC = sorted((SRC / "sandbox").glob("*.py"))
# Every module of the rollout package, which samples the completions (RL and evaluation jobs).
ROLLOUT_SRC = sorted((SRC / "rollout").glob("*.py"))
# The library code every RL job runs; each job also runs its own algorithm's module (rl/<algo>.py, imported
# lazily by rl/train.py), so editing ppo.py reruns the PPO cells only. rl/core.py only re-exports for tests.
RL_SHARED = ("__init__", "settings", "train", "trainer", "losses", "experience", "scoring", "tables")
RL_SRC = (
    [SRC / "rl" / f"{m}.py" for m in RL_SHARED]
    + [SRC / f for f in ("reward.py", "formats.py", "models.py", "tensors.py", "schedule.py")]
    + ROLLOUT_SRC
    + SANDBOX_SRC
    + [SRC / "data" / "tokenizer.py"]
)
RL_SCRIPT = SCRIPTS / "rl.py"


def rl_outputs():
    return [f"{R}/rl/{c.id}/steps.parquet" for c in RL_CELLS.values()]


def rl_spec(w) -> dict:
    cell = RL_CELL.format(**w)
    if cell not in RL_CELLS:
        raise ValueError(f"{R}/rl/{cell} is not a cell of the grid (grid.algos, grid.exclude)")
    return rl_settings.cell_spec(config, RL_CELLS[cell])


def rl_prompts():
    p = rl_settings.merged(config)["prompts"]
    return f"{R}/data/source={p['source']}/{p.get('split') or 'train'}.parquet"


# --- evaluate ---------------------------------------------------------------------------------

EVAL_BASE_CELL = "mixture={mixture}/scale={scale}/algo=base/kl=0/seed={seed}"
# Library code an evaluation depends on: editing it reruns the evaluations.
EVAL_SRC = (
    [SRC / f for f in ("evaluate.py", "formats.py", "tensors.py", "reward.py", "models.py")] + ROLLOUT_SRC + SANDBOX_SRC
)


def eval_benchmark_file(w):
    b = ec_eval.benchmarks(config)[w.benchmark]
    return f"{R}/data/source={b['source']}/{b['split']}.parquet"


def eval_outputs():
    """metrics.parquet of every RL cell and every pretrained model, for each configured benchmark."""
    names = list(ec_eval.benchmarks(config))
    base = [
        f"{R}/eval/{EVAL_BASE_CELL.format(**vars(c))}/benchmark={b}/metrics.parquet"
        for c in ec_grid.pretrain_cells(config)
        for b in names
    ]
    rl = [f"{R}/eval/{c.id}/benchmark={b}/metrics.parquet" for c in ec_grid.rl_cells(config) for b in names]
    return base + rl


# --- results ----------------------------------------------------------------------------------


def store_inputs():
    """Every per-cell file the store is built from, by table (machines: the trained cells' machine.json)."""
    rl = ec_grid.rl_cells(config)
    evals = eval_outputs()
    return {
        "machines": [f"{R}/pretrain/{c.id}/machine.json" for c in ec_base.trained_cells(config)]
        + [f"{R}/rl/{c.id}/machine.json" for c in rl],
        "curves": [f"{R}/pretrain/{c.id}/curve.parquet" for c in ec_grid.pretrain_cells(config)],
        "steps": [f"{R}/rl/{c.id}/steps.parquet" for c in rl],
        "samples": [f"{R}/rl/{c.id}/samples.parquet" for c in rl],
        "evals": evals,
        "generations": [f[: -len("metrics.parquet")] + "generations.parquet" for f in evals],
    }


def store_cells():
    """The grid's cells as coordinates; base models are algo=base, kl=0."""
    base = [
        dict(mixture=c.mixture, scale=c.scale, algo="base", kl=0.0, seed=c.seed) for c in ec_grid.pretrain_cells(config)
    ]
    return base + [c.as_dict() for c in ec_grid.rl_cells(config)]


def results_outputs():
    return [f"{R}/echo.duckdb", f"{R}/report.html", f"{R}/summary.txt", f"{R}/findings.tsv"]


# --- checkpoints ------------------------------------------------------------------------------
# A checkpoint damaged or deleted after its manifest was written is invisible to Snakemake's file
# times, so before scheduling any job the main process checks the sizes of every checkpoint the grid
# holds (a stat per file; checksums are left to the consumer jobs, which verify what they load once)
# and stops with one sentence naming the folder to delete, which reruns its writer.
if workflow.is_main_process:
    try:
        ec_manifest.check_sizes(
            [f"{R}/pretrain/{c.id}/model" for c in ec_grid.pretrain_cells(config)],
            [f"{R}/rl/{c.id}/checkpoints" for c in RL_CELLS.values()],
        )
    except ec_manifest.ManifestError as e:
        sys.exit(f"Checkpoint error: {e}")
