# Released checkpoints instead of pretraining (config base_models): for the (mixture, scale) cells listed
# there, this rule writes what the pretrain rule would (model/ ending with its manifest.json + a zero-row
# curve.parquet), so RL, evaluation and the store are unchanged. Its `cell` wildcard matches those cells
# only; ruleorder makes it win over `pretrain` there. Include it after rules/pretrain.smk.


ruleorder: base_model > pretrain


rule base_model:
    conda:
        CONDA_ENV
    output:
        model=f"{R}/pretrain/{{cell}}/model/manifest.json",
        curve=f"{R}/pretrain/{{cell}}/curve.parquet",
    input:
        SRC / "base_models.py",
        SRC / "models.py",
        SCRIPTS / "base_model.py",
    params:
        source=lambda w: BASE_MODEL_CELLS[w.cell],
    wildcard_constraints:
        cell=ec_base.cell_pattern(config),
    log:
        f"{R}/logs/base_models/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/base_models/{{cell}}.tsv"
    script:
        "../workflow_scripts/base_model.py"
