# Evaluation: one job per (cell, benchmark) scores all of that cell's checkpoints; the pretrained model
# is the cell algo=base/kl=0 with step 0. Outputs: metrics.parquet (one row per step) + generations.parquet.


rule eval_rl:
    conda:
        CONDA_ENV
    output:
        metrics=f"{R}/eval/{RL_CELL}/benchmark={{benchmark}}/metrics.parquet",
        generations=f"{R}/eval/{RL_CELL}/benchmark={{benchmark}}/generations.parquet",
    input:
        EVAL_SRC,
        SCRIPTS / "evaluate_cell.py",
        steps=f"{R}/rl/{RL_CELL}/steps.parquet",
        checkpoints=f"{R}/rl/{RL_CELL}/checkpoints/manifest.json",
        benchmark=eval_benchmark_file,
    params:
        checkpoints=lambda w: f"{R}/rl/{RL_CELL.format(**w)}",  # the steps checkpoints/manifest.json lists
        which=lambda w: ec_eval.benchmarks(config)[w.benchmark]["checkpoints"],  # all | last
        settings=lambda w: ec_eval.settings_from_config(config, int(w.seed)),
    threads: 1
    resources:
        keep_samples=ec_eval.keep_samples(config),  # runtime: a resource, which never triggers a rerun
    log:
        f"{R}/logs/eval/{RL_CELL}/benchmark={{benchmark}}.log",
    benchmark:
        f"{R}/benchmarks/eval/{RL_CELL}/benchmark={{benchmark}}.tsv"
    script:
        "../workflow_scripts/evaluate_cell.py"


rule eval_base:
    conda:
        CONDA_ENV
    output:
        metrics=f"{R}/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}/metrics.parquet",
        generations=f"{R}/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}/generations.parquet",
    input:
        EVAL_SRC,
        SCRIPTS / "evaluate_cell.py",
        model=f"{R}/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}/model/manifest.json",
        benchmark=eval_benchmark_file,
    params:
        checkpoints=lambda w, input: str(Path(input.model).parent),  # the model folder, as step 0
        which="base",
        settings=lambda w: ec_eval.settings_from_config(config, int(w.seed)),
    threads: 1
    resources:
        keep_samples=ec_eval.keep_samples(config),  # runtime: a resource, which never triggers a rerun
    log:
        f"{R}/logs/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}.log",
    benchmark:
        f"{R}/benchmarks/eval/{EVAL_BASE_CELL}/benchmark={{benchmark}}.tsv"
    script:
        "../workflow_scripts/evaluate_cell.py"
