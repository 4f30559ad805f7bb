# RL stage: one job per cell of echochamber.grid.rl_cells(config), launched with `accelerate launch`.
# Each job gets only its own settings (rl.settings.cell_spec): editing GRPO settings reruns no PPO cell,
# and editing a KL list only adds or removes cells. A killed or requeued job resumes from <cell>/resume/,
# which is no declared output, so Snakemake keeps it when it reruns the job.


rule rl:
    conda:
        CONDA_ENV
    output:
        steps=f"{R}/rl/{RL_CELL}/steps.parquet",
        samples=f"{R}/rl/{RL_CELL}/samples.parquet",
        machine=f"{R}/rl/{RL_CELL}/machine.json",
        # written last, over the planned steps: deleting it (or checkpoints/) reruns the cell
        checkpoints=f"{R}/rl/{RL_CELL}/checkpoints/manifest.json",
    input:
        lambda w: RL_SRC + [SRC / "rl" / f"{w.algo}.py"],
        script=RL_SCRIPT,
        base=f"{R}/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}/model/manifest.json",
        prompts=rl_prompts(),
    params:
        spec=lambda w: json.dumps(rl_spec(w), sort_keys=True),
        processes=lambda w: rl_spec(w)["processes"],
        precision=lambda w: rl_spec(w)["precision"],
        port=lambda w: ec_launch.port_for(RL_CELL.format(**w)),
        out=lambda w, output: Path(output.steps).parent,
        base=lambda w, input: Path(input.base).parent,
    threads: rl_settings.merged(config).threads
    resources:
        gpu=rl_settings.merged(config).gpus,
        # runtime settings travel as resources, which never trigger a rerun (params do)
        save_every=rl_settings.merged(config).save_every,
        samples_logged=rl_settings.merged(config).samples_logged,
    log:
        f"{R}/logs/rl/{RL_CELL}.log",
    benchmark:
        f"{R}/benchmarks/rl/{RL_CELL}.tsv"
    shell:
        # echochamber.launch picks the GPUs of the job's node, else --cpu; rank 0 writes, all ranks log here.
        "python -m echochamber.launch --processes {params.processes} --port {params.port} --precision {params.precision}"
        " {input.script} --spec {params.spec:q} --base {params.base} --prompts {input.prompts}"
        " --out {params.out} --threads {threads} --save-every {resources.save_every}"
        " --samples-logged {resources.samples_logged} > {log} 2>&1"
