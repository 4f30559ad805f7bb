"""Tokenizers: a byte-level BPE trained on the mixture text (mini-study) or a pretrained one (paper).

Digits are split one per token, as the Llama-2 tokenizer of the paper does, and every newline is a
token of its own, so a prompt ending in the blank line tokenizes exactly as the start of a training
document does (a merged "\n\n" at the end of a prompt would be a token the model never saw there). Every
tokenizer is saved as a ``transformers`` folder with an EOS and a pad token, so checkpoints load it with AutoTokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def pretrained(name: str):
    """A hub tokenizer (the paper's Llama-2); a pad token is added if it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise RuntimeError(f"cannot load tokenizer {name!r} from the hub or its cache ({e}); "
                           f"set tokenizer.name to a local folder holding tokenizer files") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer_config.json there")
    return AutoTokenizer.from_pretrained(path)


class SourceError(ValueError):
    """A source file the tokenizer cannot read; the message is one sentence."""


def documents(parquet_files: Iterable[str | Path]) -> Iterator[str]:
    """The text of every document of some source splits (question + blank line + solution)."""
    import pyarrow.parquet as pq

    from echochamber.formats import document
    from echochamber.io import unreadable

    for f in parquet_files:
        try:
            table = pq.read_table(f, columns=["question", "solution"])
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file is a user-facing data problem
            raise SourceError(unreadable("source file", f, e)) from None
        for q, s in zip(table["question"].to_pylist(), table["solution"].to_pylist()):
            yield document(q, s)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of ``formats.prompt(question)`` exactly as they appear inside a training document.

    A byte-level BPE merges the trailing blank line into one token when it ends the text, but splits it
    when a solution follows (as in pretraining); so the prompt is encoded with a following letter and
    cut at the prompt's last character.
    """
    from echochamber.formats import prompt

    text = prompt(question)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text + "A", add_special_tokens=False, return_offsets_mapping=True)
        ids = [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end <= len(text)]
        if ids and tokenizer.decode(ids) == text:
            return ids
    return tokenizer.encode(text, add_special_tokens=False)
