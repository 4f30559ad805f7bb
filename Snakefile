# echo-chamber: data mixture x model scale x RL algorithm (x KL x seed), into one DuckDB store.
#   snakemake --cores all                                   the embedded mini-study (config.yaml)
#   snakemake --profile profiles/slurm --configfile configs/paper.yaml   the paper's grid on Slurm
#   snakemake --cores all --configfile configs/mini_paper.yaml   the mini-paper (an overlay of config.yaml)
import sys

from snakemake.utils import min_version

from echochamber import config as ec_config

min_version("9.0")


# A --configfile (e.g. configs/paper.yaml) replaces the embedded default instead of merging into it;
# several are merged in order, later ones winning. An overlay names the config it extends
# (configs/mini_paper.yaml: `extends: ../config.yaml`): that file is read first, the given ones over it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"

else:
    try:
        overlaid = ec_config.bases(workflow.overwrite_configfiles)
    except ec_config.ConfigError as e:
        sys.exit(f"Config error: {e}")
    for base in overlaid:

        configfile: base


report: "rules/report/workflow.rst"  # `snakemake --report report.zip`: figures, findings, runtimes


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/base_models.smk"
include: "rules/rl.smk"
include: "rules/evaluate.smk"
include: "rules/results.smk"


rule all:
    default_target: True
    input:
        data_outputs(),
        tokenizer_outputs(),
        pretrain_outputs(),
        rl_outputs(),
        eval_outputs(),
        results_outputs(),


onstart:
    warn_if_grid_too_large()


onsuccess:
    print(final_message())
