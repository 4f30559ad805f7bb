"""Data mixtures: each source tokenized once, then sources with weights -> a manifest of token shards.

A mixture names sources with weights, as in the paper's ``as_fm3_tg_4xomi1``: the integer part of a
weight repeats the whole source, the fractional part adds a seeded random subset of its documents
(2.5 = two full copies plus half the documents). Each document is tokenized as question + blank line +
solution followed by EOS, with no BOS (:func:`echochamber.formats.document`).

A source is tokenized once (``results/tokens/source=S/``), whatever the number of mixtures that use it,
because at paper scale the same 45B tokens of FineMath and the algebraic stack are in all 11::

    manifest.json            documents, tokens, the tokenizer and the shard list
    S.000.bin                the documents packed back to back (raw uint16/uint32, memmapped)
    doc_lengths.npy          tokens per document (to cut seeded subsets)
    counts.npy               tokens per vocabulary entry (for the unigram entropy)

A mixture (``results/mixtures/mixture=M/``) holds only its manifest and the fractional subsets
(``omi1.part.000.bin``): whole copies are segments pointing at the source's shards, listed once per
copy, and :class:`TokenStream` reads the segments as one long token stream that training cuts into
sequences. Tokenization streams the parquet files in record batches, so a source larger than memory
is fine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echochamber.io import atomic_path, unreadable

MANIFEST = "manifest.json"
LENGTHS, COUNTS = "doc_lengths.npy", "counts.npy"
SHARD_TOKENS = 1 << 30          # tokens per shard file before a new one is started
BATCH_ROWS = 4096               # parquet rows tokenized at a time
SUBSET_DOCS = 65536             # documents of a fractional subset copied at a time


class MixtureError(ValueError):
    """A user mistake around a mixture (missing source file, unreadable manifest); one sentence."""


@dataclass(frozen=True)
class Share:
    """How a weight is realised: ``copies`` whole passes plus a ``fraction`` of the documents."""
    copies: int
    fraction: float

    @classmethod
    def of(cls, weight: float) -> Share:
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"a mixture weight must be a positive number, not {weight!r}")
        copies = int(math.floor(weight + 1e-9))
        fraction = float(weight) - copies
        return cls(copies, 0.0 if fraction < 1e-9 else fraction)


def subset_mask(n_docs: int, fraction: float, seed: int, source: str) -> np.ndarray:
    """A seeded choice of ``round(fraction * n_docs)`` documents (boolean mask, same for the same inputs)."""
    mask = np.zeros(n_docs, dtype=bool)
    k = int(round(fraction * n_docs))
    if k:
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        mask[rng.choice(n_docs, size=k, replace=False)] = True
    return mask


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenizer_info(tokenizer, path: str | os.PathLike | None = None) -> dict:
    """What the manifest records about the tokenizer: enough to tell two tokenizers apart."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {"path": str(path) if path is not None else None, "name": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "vocab_sha256": digest}


class _ShardWriter:
    """Append token arrays to ``{prefix}.{i:03d}.bin`` files, starting a new file every ``shard_tokens``."""

    def __init__(self, folder: Path, prefix: str, dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.files: list[tuple[str, int]] = []          # (file name, tokens)
        self._fh = None
        self._in_file = 0

    def write(self, tokens: np.ndarray) -> None:
        if self._fh is None or self._in_file >= self.shard_tokens:
            self._open()
        tokens.astype(self.dtype, copy=False).tofile(self._fh)
        self._in_file += len(tokens)
        self.files[-1] = (self.files[-1][0], self._in_file)

    def _open(self) -> None:
        self.close()
        name = f"{self.prefix}.{len(self.files):03d}.bin"
        self._fh = open(self.folder / name, "wb")
        self._in_file = 0
        self.files.append((name, 0))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _documents(parquet: Path, batch_rows: int):
    """Yield lists of document texts from one source file, a record batch at a time."""
    import pyarrow.parquet as pq

    from echochamber.formats import document

    pf = pq.ParquetFile(parquet)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["question", "solution"]):
        qs, ss = batch.column("question").to_pylist(), batch.column("solution").to_pylist()
        yield [document(q or "", s or "") for q, s in zip(qs, ss)]


def _n_rows(parquet: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(parquet).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - an unreadable file is a user-facing data problem
        raise MixtureError(unreadable("source file", parquet, e)) from None


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document followed by EOS; no BOS or other special tokens."""
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _flat(docs: list[list[int]]) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=sum(map(len, docs)))


def tokenize_source(source: str, parquet: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, *,
                    tokenizer_path: str | os.PathLike | None = None, shard_tokens: int = SHARD_TOKENS,
                    batch_rows: int = BATCH_ROWS, log=None) -> dict:
    """Tokenize one source's documents into ``out_dir`` (written atomically); return its manifest.

    ``parquet`` is the source's train file (schema of ``echochamber.data.synthetic.SCHEMA``: at least
    ``question`` and ``solution``).
    """
    path = Path(parquet)
    if not path.is_file():
        raise MixtureError(f"the data file of source {source!r}, {path}, does not exist; "
                           f"build it first (rule source) or fix data.sources.{source}")
    n_docs = _n_rows(path)
    vocab, dtype = len(tokenizer), token_dtype(len(tokenizer))
    counts, lengths = np.zeros(vocab, dtype=np.int64), np.zeros(n_docs, dtype=np.int64)
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        shards = _ShardWriter(tmp, source, dtype, shard_tokens)
        i = 0
        for texts in _documents(path, batch_rows):
            ids = encode(tokenizer, texts)
            flat = _flat(ids)
            counts += np.bincount(flat, minlength=vocab)
            lengths[i:i + len(ids)] = [len(d) for d in ids]
            shards.write(flat)
            i += len(ids)
        shards.close()
        np.save(tmp / LENGTHS, lengths)
        np.save(tmp / COUNTS, counts)
        manifest = {
            "source": source, "file": str(path), "tokenizer": tokenizer_info(tokenizer, tokenizer_path),
            "dtype": np.dtype(dtype).name, "documents": n_docs, "tokens": int(counts.sum()),
            "segments": [{"source": source, "file": f, "tokens": n} for f, n in shards.files],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if log:
        log.info("source %s: %d documents, %d tokens", source, n_docs, manifest["tokens"])
    return manifest


def build(name: str, weights: dict[str, float], token_dirs: dict[str, str | os.PathLike],
          out_dir: str | os.PathLike, *, seed: int, shard_tokens: int = SHARD_TOKENS, log=None) -> dict:
    """Pack one mixture of tokenized sources (:func:`tokenize_source`) into ``out_dir`` (written
    atomically); return its manifest. ``token_dirs`` maps each source of ``weights`` to its folder."""
    out_dir = Path(out_dir)
    tokenized = {}
    for src in weights:
        if src not in token_dirs:
            raise MixtureError(f"mixture {name}: no tokenized data given for source {src!r}")
        tokenized[src] = read_manifest(token_dirs[src])
    first = next(iter(tokenized.values()))
    for src, info in tokenized.items():
        if info["tokenizer"]["vocab_sha256"] != first["tokenizer"]["vocab_sha256"]:
            raise MixtureError(f"mixture {name}: source {src!r} in {token_dirs[src]} was tokenized with another "
                               f"tokenizer than the other sources; rebuild its tokens")
    dtype = np.dtype(first["dtype"])
    vocab = first["tokenizer"]["vocab_size"]
    counts_total = np.zeros(vocab, dtype=np.int64)
    sources, segments = {}, []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for src, weight in weights.items():
            info, folder = tokenized[src], Path(token_dirs[src])
            share = Share.of(float(weight))
            full = [{**seg, "file": os.path.relpath(folder / seg["file"], out_dir)} for seg in info["segments"]]
            segments += full * share.copies
            counts_part, part_docs = np.zeros(vocab, dtype=np.int64), 0
            if share.fraction:
                mask = subset_mask(info["documents"], share.fraction, seed, src)
                part = _ShardWriter(tmp, f"{src}.part", dtype, shard_tokens)
                counts_part = _copy_documents(folder, np.flatnonzero(mask), part, vocab)
                part.close()
                part_docs = int(mask.sum())
                segments += [{"source": src, "file": f, "tokens": n} for f, n in part.files]
            counts_full = _load(folder / COUNTS)
            counts_total += share.copies * counts_full + counts_part
            entry = {
                "file": info["file"], "tokens_dir": str(folder), "weight": float(weight), "copies": share.copies,
                "fraction": share.fraction, "source_documents": info["documents"],
                "source_tokens": info["tokens"], "documents": share.copies * info["documents"] + part_docs,
                "tokens": share.copies * info["tokens"] + int(counts_part.sum()),
            }
            sources[src] = entry
            if log:
                log.info("mixture %s: source %s x%s -> %d documents, %d tokens", name, src, weight,
                         entry["documents"], entry["tokens"])
        manifest = {
            "mixture": name, "weights": {k: float(v) for k, v in weights.items()}, "seed": seed,
            "tokenizer": first["tokenizer"], "dtype": dtype.name,
            "documents": sum(s["documents"] for s in sources.values()),
            "tokens": int(counts_total.sum()),
            "unigram_entropy": unigram_entropy(counts_total),
            "sources": sources, "segments": segments,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise MixtureError(f"token file {path} is missing or unreadable ({type(e).__name__}); "
                           f"rebuild the source's tokens") from None


def _copy_documents(folder: Path, docs: np.ndarray, writer: _ShardWriter, vocab: int) -> np.ndarray:
    """Append the documents ``docs`` (sorted indices) of a tokenized source to ``writer``; their token counts."""
    lengths = _load(folder / LENGTHS)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream, counts = TokenStream(folder), np.zeros(vocab, dtype=np.int64)
    for chunk in np.array_split(docs, max(1, -(-len(docs) // SUBSET_DOCS))):
        if len(chunk):
            flat = np.concatenate([stream.read(int(starts[d]), int(lengths[d])) for d in chunk])
            counts += np.bincount(flat, minlength=vocab)
            writer.write(flat)
    return counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats per token of the token frequencies (the loss of the best context-free model)."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a mixture or tokenized-source folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MixtureError(f"token folder {Path(folder)} has no {MANIFEST}; build it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MixtureError(f"manifest {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


class TokenStream:
    """The segments of a mixture (or of a tokenized source) read as one token stream, cut into
    fixed-length sequences (memory-mapped). Segment files are relative to the folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        dtype = np.dtype(self.manifest["dtype"])
        self._maps: dict[str, np.ndarray] = {}
        self._segments = []
        for seg in self.manifest["segments"]:
            f = seg["file"]
            if f not in self._maps:
                path = Path(os.path.normpath(self.folder / f))  # a source's shard: ../../tokens/...
                expected = seg["tokens"] * dtype.itemsize
                if not path.is_file() or path.stat().st_size != expected:
                    raise MixtureError(f"token shard {path} is missing or truncated "
                                       f"(expected {expected} bytes); rebuild it")
                self._maps[f] = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
            self._segments.append(self._maps[f])
        lengths = np.array([len(s) for s in self._segments], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.n_tokens = int(self._starts[-1])

    def n_sequences(self, seq_len: int) -> int:
        return self.n_tokens // seq_len

    def shuffled(self, eos_id: int, seed: int) -> ShuffledDocuments:
        """This stream's documents in a seeded random order (:class:`ShuffledDocuments`)."""
        return ShuffledDocuments(self, eos_id, seed)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, across piece boundaries (``_starts`` holds
        where each piece begins: a segment here, a document in :class:`ShuffledDocuments`)."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        piece = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            offset = int(pos - self._starts[piece])
            take = min(length - filled, int(self._starts[piece + 1] - pos))
            out[filled:filled + take] = self._piece(piece, offset, take)
            filled += take
            pos += take
            piece += 1
        return out

    def _piece(self, i: int, offset: int, take: int) -> np.ndarray:
        return self._segments[i][offset:offset + take]

    def sequences(self, indices, seq_len: int, starts: np.ndarray | None = None) -> np.ndarray:
        """The sequences with these indices, as an int64 array of shape (len(indices), seq_len).

        Sequence ``i`` starts at token ``i * seq_len`` (the stream cut into equal pieces), or at
        ``starts[i]`` when given (:meth:`document_windows`)."""
        if not len(indices):
            return np.zeros((0, seq_len), dtype=np.int64)
        offsets = starts[indices] if starts is not None else np.asarray(indices, dtype=np.int64) * seq_len
        return np.stack([self.read(int(o), seq_len) for o in offsets])

    def document_starts(self, eos_id: int) -> np.ndarray:
        """Token offset of every document in the stream (the first token, and each token after an EOS)."""
        after_eos = [np.flatnonzero(np.asarray(seg) == eos_id) + 1 + start
                     for seg, start in zip(self._segments, self._starts[:-1])]
        starts = np.concatenate([[0], *after_eos]).astype(np.int64)
        return starts[starts < self.n_tokens]

    def document_windows(self, seq_len: int, eos_id: int) -> np.ndarray:
        """Where each of the :meth:`n_sequences` windows starts when windows begin at documents.

        Window ``i`` covers ``[i * seq_len, (i + 1) * seq_len)`` of the stream, moved forward to the first
        document that begins inside that span, so no window opens in the middle of a document (the
        document cut at its end is not continued in the next window); a span inside one long document,
        where none begins, stays where it is. The last windows are kept within the stream.
        """
        n = self.n_sequences(seq_len)
        docs = self.document_starts(eos_id)
        base = np.arange(n, dtype=np.int64) * seq_len
        j = np.searchsorted(docs, base)
        first = docs[np.minimum(j, len(docs) - 1)]
        inside = (j < len(docs)) & (first < base + seq_len)
        return np.minimum(np.where(inside, first, base), self.n_tokens - seq_len)


class ShuffledDocuments(TokenStream):
    """The documents of a stream in a seeded random order, packed back to back: the same tokens, but a
    document's neighbours come from any source, as pretraining pipelines shuffle before they pack (in the
    mixture's own order a sequence holds documents of one source, so the format of the one before it
    tells the model which format comes next, and the format chosen for a bare question is learned from
    only the first document of each sequence). Its pieces are documents read from the stream; reading and
    cutting into sequences are :class:`TokenStream`'s."""

    def __init__(self, stream: TokenStream, eos_id: int, seed: int):
        self.folder, self.manifest, self._stream = stream.folder, stream.manifest, stream
        starts = stream.document_starts(eos_id)
        lengths = np.diff(np.append(starts, stream.n_tokens))
        order = np.random.default_rng([seed, zlib.crc32(b"documents")]).permutation(len(starts))
        self._from = starts[order]
        self._starts = np.concatenate([[0], np.cumsum(lengths[order])])
        self.n_tokens = stream.n_tokens

    def _piece(self, i: int, offset: int, take: int) -> np.ndarray:
        return self._stream.read(int(self._from[i]) + offset, take)

    def document_starts(self, eos_id: int | None = None) -> np.ndarray:
        return self._starts[:-1].copy()
