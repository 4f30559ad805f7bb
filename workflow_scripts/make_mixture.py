"""Tokenize and pack one mixture into token shards + manifest.json (rule `mixture`)."""
from pathlib import Path

from echochamber.data import mixture, tokenizer
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
tok_dir = Path(snakemake.input.tokenizer).parent
manifest = mixture.build(snakemake.wildcards.mixture, snakemake.params.weights,
                         dict(zip(snakemake.params.sources, snakemake.input.train)), tokenizer.load(tok_dir),
                         Path(snakemake.output[0]).parent, seed=snakemake.params.seed, tokenizer_path=tok_dir,
                         log=log)
log.info("mixture %s: %d documents, %d tokens, unigram entropy %.3f nats", snakemake.wildcards.mixture,
         manifest["documents"], manifest["tokens"], manifest["unigram_entropy"])
