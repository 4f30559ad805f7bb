"""Write one source's train/test/hard parquet files (rule `source`)."""
import sys

from echochamber.data.sources import build
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
try:
    counts = build(snakemake.wildcards.source, snakemake.params.spec, dict(snakemake.output.items()))
except Exception as e:  # HubError and friends: one sentence for the user, details in the log
    log.exception("source %s failed", snakemake.wildcards.source)
    sys.exit(f"source {snakemake.wildcards.source}: {e}")
log.info("source %s: %s rows", snakemake.wildcards.source, counts)
