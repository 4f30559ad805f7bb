"""Pack one mixture of tokenized sources into a manifest.json and its fractional subsets (rule `mixture`)."""
from pathlib import Path

from echochamber.data import mixture
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
token_dirs = {src: Path(m).parent for src, m in zip(snakemake.params.sources, snakemake.input.tokens)}
manifest = mixture.build(snakemake.wildcards.mixture, snakemake.params.weights, token_dirs,
                         Path(snakemake.output[0]).parent, seed=snakemake.params.seed, log=log)
log.info("mixture %s: %d documents, %d tokens, unigram entropy %.3f nats", snakemake.wildcards.mixture,
         manifest["documents"], manifest["tokens"], manifest["unigram_entropy"])
