"""Write one source's train/test/hard parquet files (rule `source`)."""
from echochamber.data.sources import build
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
counts = build(snakemake.wildcards.source, snakemake.params.spec, dict(snakemake.output.items()))
log.info("source %s: %s rows", snakemake.wildcards.source, counts)
