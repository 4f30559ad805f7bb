# Evaluation: one job per (cell, benchmark) scores all of that cell's checkpoints; the pretrained model
# is the cell algo=base/kl=0 with step 0. Outputs: metrics.parquet (one row per step) + generations.parquet.
from echochamber import evaluate as ec_eval

try:
    ec_eval.check_config(config)
except ec_eval.EvalError as e:
    sys.exit(f"Config error: config: {e}")

EVAL_RL_CELL = "mixture={mixture}/scale={scale}/algo={algo}/kl={kl}/seed={seed}"
EVAL_BASE_CELL = "mixture={mixture}/scale={scale}/algo=base/kl=0/seed={seed}"
# Library code an evaluation depends on; modules still being written are listed once they exist.
EVAL_SRC = [SRC / f for f in ("evaluate.py", "formats.py", "rollout.py", "reward.py", "sandbox.py", "models.py")
            if (SRC / f).exists()]


wildcard_constraints:
    benchmark=r"[A-Za-z0-9_]+",


def eval_benchmark_file(w):
    b = ec_eval.benchmarks(config)[w.benchmark]
    return f"{R}/data/source={b['source']}/{b['split']}.parquet"


def eval_outputs():
    """metrics.parquet of every RL cell and every pretrained model, for each configured benchmark."""
    names = list(ec_eval.benchmarks(config))
    base = [f"{R}/eval/{EVAL_BASE_CELL.format(**vars(c))}/benchmark={b}/metrics.parquet"
            for c in ec_grid.pretrain_cells(config) for b in names]
    rl = [f"{R}/eval/{c.id}/benchmark={b}/metrics.parquet" for c in ec_grid.rl_cells(config) for b in names]
    return base + rl


rule eval_rl:
    output:
        metrics=f"{R}/eval/{EVAL_RL_CELL}/benchmark={{benchmark}}/metrics.parquet",
        generations=f"{R}/eval/{EVAL_RL_CELL}/benchmark={{benchmark}}/generations.parquet",
    input:
        EVAL_SRC,
        steps=f"{R}/rl/{EVAL_RL_CELL}/steps.parquet",
        checkpoints=f"{R}/rl/{EVAL_RL_CELL}/checkpoints",
        benchmark=eval_benchmark_file,
    params:
        checkpoints=lambda w: f"{R}/rl/{EVAL_RL_CELL.format(**w)}",   # its checkpoints/step=T/ folders
        settings=lambda w: ec_eval.settings_from_config(config, int(w.seed)),
    threads: 1
    log:
        f"{R}/logs/eval/{EVAL_RL_CELL}/benchmark={{benchmark}}.log",
    benchmark:
        f"{R}/benchmarks/eval/{EVAL_RL_CELL}/benchmark={{benchmark}}.tsv"
    script:
        "../workflow_scripts/evaluate_cell.py"


rule eval_base:
    output:
        metrics=f"{R}/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}/metrics.parquet",
        generations=f"{R}/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}/generations.parquet",
    input:
        EVAL_SRC,
        model=f"{R}/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}/model",
        benchmark=eval_benchmark_file,
    params:
        checkpoints=lambda w, input: {0: input.model},
        settings=lambda w: ec_eval.settings_from_config(config, int(w.seed)),
    threads: 1
    log:
        f"{R}/logs/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}.log",
    benchmark:
        f"{R}/benchmarks/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}.tsv"
    script:
        "../workflow_scripts/evaluate_cell.py"
