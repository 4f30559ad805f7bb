"""Build the DuckDB results store from the explicit list of per-cell files (rule `ingest`, the only writer)."""
import sys

from echochamber import store
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
files = [f for key in ("curves", "steps", "samples", "evals", "generations", "machines") for f in snakemake.input[key]]
try:
    counts = store.build(snakemake.output[0], files, cells=snakemake.params.cells,
                         benchmarks=snakemake.params.benchmarks, scales=snakemake.params.scales, log=log)
except store.StoreError as e:
    log.error("%s", e)
    sys.exit(f"Ingest error: {e}")
log.info("store %s: %s", snakemake.output[0], counts)
