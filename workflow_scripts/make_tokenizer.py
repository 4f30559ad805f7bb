"""Train (or fetch) the tokenizer and save it as a transformers folder (rule `tokenizer`)."""
import sys
from pathlib import Path

from echochamber.data import tokenizer
from echochamber.io import atomic_path, setup_logging

log = setup_logging(snakemake.log[0])
spec = snakemake.params.spec
if spec["kind"] == "bpe":
    try:
        tok = tokenizer.train_bpe(tokenizer.documents(snakemake.input.train), spec["vocab_size"])
    except tokenizer.SourceError as e:
        log.error("%s", e)
        sys.exit(f"Data error: {e}")
else:
    tok = tokenizer.pretrained(spec["name"])
with atomic_path(Path(snakemake.output[0]).parent) as tmp:
    tok.save_pretrained(tmp)
log.info("tokenizer with %d tokens saved to %s", len(tok), Path(snakemake.output[0]).parent)
