"""Evaluate one cell's checkpoints on one benchmark (rules `eval_rl` and `eval_base`)."""
import sys

import torch

from echochamber import evaluate
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
try:
    checkpoints = (evaluate.base_checkpoint(p.checkpoints) if p.which == "base"
                   else evaluate.find_checkpoints(p.checkpoints, which=p.which))
    log.info("evaluating %d checkpoint(s) (steps %s) on %s", len(checkpoints), list(checkpoints),
             snakemake.input.benchmark)
    settings = {**p.settings, "keep_samples": snakemake.resources.keep_samples}   # runtime: not in params
    evaluate.evaluate_checkpoints(checkpoints, snakemake.input.benchmark, settings,
                                  snakemake.output.metrics, snakemake.output.generations, log=log)
except evaluate.EvalError as e:
    log.error("%s", e)
    sys.exit(f"Evaluation error: {e}")
