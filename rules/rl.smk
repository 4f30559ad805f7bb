# RL stage: one job per cell of echochamber.grid.rl_cells(config), launched with `accelerate launch`.
# Each job gets only its own settings (rl.settings.cell_spec): editing GRPO settings reruns no PPO cell,
# and editing a KL list only adds or removes cells.


rule rl:
    conda:
        CONDA_ENV
    output:
        steps=f"{R}/rl/{RL_CELL}/steps.parquet",
        samples=f"{R}/rl/{RL_CELL}/samples.parquet",
        checkpoints=directory(f"{R}/rl/{RL_CELL}/checkpoints"),
    input:
        lambda w: RL_SRC + [SRC / "rl" / f"{w.algo}.py"],
        script=RL_SCRIPT,
        base=f"{R}/pretrain/mixture={{mixture}}/scale={{scale}}/seed={{seed}}/model",
        prompts=rl_prompts(),
    params:
        spec=lambda w: json.dumps(rl_spec(w), sort_keys=True),
        processes=lambda w: rl_spec(w)["processes"],
        mixed_precision=lambda w: "bf16" if rl_spec(w)["precision"] == "bf16" else "no",
        port=lambda w: 29500 + zlib.crc32(RL_CELL.format(**w).encode()) % 2000,
        out=lambda w, output: Path(output.steps).parent,
    threads: rl_settings.merged(config)["threads"]
    resources:
        gpu=rl_settings.merged(config)["gpus"],
    log:
        f"{R}/logs/rl/{RL_CELL}.log",
    benchmark:
        f"{R}/benchmarks/rl/{RL_CELL}.tsv"
    shell:
        # --cpu where the job's node has no GPU; rank 0 writes the outputs, all ranks log here.
        """
        if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=""; else DEVICE="--cpu"; fi
        python -m accelerate.commands.launch $DEVICE --num_machines 1 --num_processes {params.processes} \
            --main_process_port {params.port} --mixed_precision {params.mixed_precision} --dynamo_backend no \
            {input.script} --spec {params.spec:q} --base {input.base} --prompts {input.prompts} \
            --out {params.out} --threads {threads} > {log} 2>&1
        """
