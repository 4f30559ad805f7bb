# Pretraining stage: each source tokenized once, each mixture packed from them, then one model per
# (mixture, scale, seed), trained by `accelerate launch` with the process count from the rule's
# resources: one process per GPU (pretrain.gpus, per scale in pretrain.per_scale), else
# pretrain.processes on CPUs.


rule tokens:
    conda:
        CONDA_ENV
    output:
        f"{R}/tokens/source={{source}}/manifest.json",
    input:
        SRC / "data" / "mixture.py",
        SRC / "formats.py",
        SCRIPTS / "tokenize_source.py",
        tokenizer=f"{R}/tokenizer/tokenizer_config.json",
        train=f"{R}/data/source={{source}}/train.parquet",
    log:
        f"{R}/logs/tokens/source={{source}}.log",
    benchmark:
        f"{R}/benchmarks/tokens/source={{source}}.tsv"
    script:
        "../workflow_scripts/tokenize_source.py"


rule mixture:
    conda:
        CONDA_ENV
    output:
        f"{R}/mixtures/mixture={{mixture}}/manifest.json",
    input:
        SRC / "data" / "mixture.py",
        SCRIPTS / "make_mixture.py",
        tokens=lambda w: [f"{R}/tokens/source={s}/manifest.json" for s in config["mixtures"][w.mixture]],
    params:
        weights=lambda w: config["mixtures"][w.mixture],
        sources=lambda w: list(config["mixtures"][w.mixture]),
        seed=config["seed"],
    log:
        f"{R}/logs/mixtures/mixture={{mixture}}.log",
    benchmark:
        f"{R}/benchmarks/mixtures/mixture={{mixture}}.tsv"
    script:
        "../workflow_scripts/make_mixture.py"


rule pretrain:
    conda:
        CONDA_ENV
    output:
        model=f"{PRETRAIN_CELL}/model/manifest.json",  # written last (echochamber.manifest)
        curve=f"{PRETRAIN_CELL}/curve.parquet",
        machine=f"{PRETRAIN_CELL}/machine.json",
    input:
        SRC / "pretrain.py",
        SRC / "schedule.py",
        SRC / "models.py",
        SRC / "data" / "mixture.py",
        script=SCRIPTS / "pretrain.py",
        mixture=f"{R}/mixtures/mixture={{mixture}}/manifest.json",
        tokenizer=f"{R}/tokenizer/tokenizer_config.json",
    params:
        settings=lambda w: shlex.quote(json.dumps(ec_pretrain.settings(config, w.scale, int(w.seed)), sort_keys=True)),
        launch=lambda w, resources: ec_launch.launch_args(ec_launch.job_processes(resources)),
        cell=lambda w, output: str(Path(output.curve).parent),
    threads: ec_pretrain.threads(config)
    priority: lambda w: ec_grid.pretrain_priority(config, w.scale)  # the largest scales start first
    resources:
        processes=lambda w: ec_pretrain.processes(config, w.scale),
        gpu=lambda w: ec_pretrain.gpus(config, w.scale),
        # runtime settings travel as resources, which never trigger a rerun (params do)
        save_every=lambda w: ec_pretrain.save_every(config, w.scale),
        micro_batch_size=lambda w: ec_pretrain.micro_batch_size(config, w.scale),
    log:
        f"{R}/logs/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}.log",
    benchmark:
        f"{R}/benchmarks/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}.tsv"
    shell:
        "python -m accelerate.commands.launch {params.launch} {input.script}"
        " --settings {params.settings} --save-every {resources.save_every}"
        " --micro-batch-size {resources.micro_batch_size} --mixture $(dirname {input.mixture})"
        " --tokenizer $(dirname {input.tokenizer}) --out {params.cell} --threads {threads} > {log} 2>&1"
