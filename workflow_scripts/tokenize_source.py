"""Tokenize one source's train documents into token shards + manifest.json (rule `tokens`)."""
from pathlib import Path

from echochamber.data import mixture, tokenizer
from echochamber.io import setup_logging

log = setup_logging(snakemake.log[0])
tok_dir = Path(snakemake.input.tokenizer).parent
mixture.tokenize_source(snakemake.wildcards.source, snakemake.input.train, tokenizer.load(tok_dir),
                        Path(snakemake.output[0]).parent, tokenizer_path=tok_dir, log=log)
