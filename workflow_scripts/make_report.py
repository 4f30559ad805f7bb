"""Draw the paper's figures and write report.html and summary.txt from the store (rule `report`)."""
import sys

from echochamber import report, store
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
try:
    report.build(snakemake.input.db, snakemake.output.html, snakemake.output.figures, snakemake.output.summary,
                 mixtures=snakemake.params.mixtures, scales=snakemake.params.scales,
                 findings_out=snakemake.output.findings, log=log)
except store.StoreError as e:
    log.error("%s", e)
    sys.exit(f"Report error: {e}")
