"""Materialise a released checkpoint as a pretraining cell: model/ + an empty curve.parquet (rule `base_model`)."""
import sys
from pathlib import Path

from echochamber import base_models
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
try:
    model_dir = Path(snakemake.output.model).parent        # the declared output is its manifest.json
    base_models.materialise(snakemake.params.source, model_dir, snakemake.output.curve, log=log)
except base_models.BaseModelError as e:
    log.error("%s", e)
    sys.exit(f"Base model error: {e}")
