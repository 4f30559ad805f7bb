# RL stage: one job per cell of echochamber.grid.rl_cells(config), launched with `accelerate launch`.
# Each job gets only its own settings (rl.settings.cell_spec): editing GRPO settings reruns no PPO cell,
# and editing a KL list only adds or removes cells.
import json
import zlib

from echochamber.rl import settings as rl_settings

try:
    rl_settings.check(config)
except ec_config.ConfigError as e:
    sys.exit(f"Config error: {e}")

RL_CELLS = {c.id: c for c in ec_grid.rl_cells(config)}
RL_CELL = "mixture={mixture}/scale={scale}/algo={algo}/kl={kl}/seed={seed}"
# The library code every RL job runs; each job also runs its own algorithm's module (rl/<algo>.py, imported
# lazily by rl/train.py), so editing ppo.py reruns the PPO cells only.
RL_SRC = [SRC / "rl" / f for f in ("__init__.py", "settings.py", "core.py", "train.py")] \
    + [SRC / f for f in ("reward.py", "rollout.py", "sandbox.py", "formats.py", "models.py")] \
    + [SRC / "data" / "tokenizer.py"]
RL_SCRIPT = Path(workflow.basedir) / "workflow_scripts" / "rl.py"


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


rule rl:
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
    log:
        f"{R}/logs/rl/{RL_CELL}.log",
    benchmark:
        f"{R}/benchmarks/rl/{RL_CELL}.tsv"
    shell:
        # --cpu where the job's node has no GPU; rank 0 writes the outputs, all ranks log here.
        """
        if {PY} -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=""; else DEVICE="--cpu"; fi
        {PY} -m accelerate.commands.launch $DEVICE --num_machines 1 --num_processes {params.processes} \
            --main_process_port {params.port} --mixed_precision {params.mixed_precision} --dynamo_backend no \
            {input.script} --spec {params.spec:q} --base {input.base} --prompts {input.prompts} \
            --out {params.out} --threads {threads} > {log} 2>&1
        """
