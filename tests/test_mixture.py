"""Mixtures: weights -> copies and seeded fractions, documents + EOS packed into memmapped shards."""

import json

import numpy as np
import pytest

from echochamber.data import mixture as M
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer
from echochamber.formats import document

N = {"tg": 40, "omi2": 30}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two synthetic sources, a BPE tokenizer, and each source tokenized once (as rule `tokens` does)."""
    root = tmp_path_factory.mktemp("mixture")
    files, rows, tokens = {}, {}, {}
    for src, render in (("tg", "tinygsm"), ("omi2", "omi2")):
        rows[src] = synthetic.generate(src, render, "train", N[src], seed=0, difficulty=synthetic.Difficulty())
        files[src] = root / f"{src}.parquet"
        synthetic.write_parquet(rows[src], files[src])
    tok = ec_tokenizer.train_bpe(ec_tokenizer.documents(files.values()), 300)
    for src, path in files.items():
        tokens[src] = root / "tokens" / f"source={src}"
        M.tokenize_source(src, path, tok, tokens[src], tokenizer_path=root / "tok")
    return root, files, rows, tok, tokens


def _docs(rows):
    return [document(r["question"], r["solution"]) for r in rows]


def _split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1, "the stream must end with EOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]


@pytest.mark.parametrize("weight,copies,fraction", [(1, 1, 0.0), (4, 4, 0.0), (2.5, 2, 0.5), (0.25, 0, 0.25)])
def test_a_weight_is_whole_copies_plus_a_fraction(weight, copies, fraction):
    share = M.Share.of(weight)
    assert (share.copies, share.fraction) == (copies, pytest.approx(fraction))


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_a_weight_must_be_positive_and_finite(weight):
    with pytest.raises(ValueError, match="positive"):
        M.Share.of(weight)


def test_fractions_pick_a_seeded_subset():
    a = M.subset_mask(1000, 0.3, seed=0, source="tg")
    assert a.sum() == 300 and np.array_equal(a, M.subset_mask(1000, 0.3, seed=0, source="tg"))
    assert not np.array_equal(a, M.subset_mask(1000, 0.3, seed=1, source="tg"))
    assert not np.array_equal(a, M.subset_mask(1000, 0.3, seed=0, source="omi2"))


def test_token_dtype_fits_the_vocabulary():
    assert M.token_dtype(32000) == np.uint16 and M.token_dtype(65536) == np.uint16
    assert M.token_dtype(65537) == np.uint32


def test_mixture_packs_documents_with_eos_and_no_bos_and_repeats_by_weight(world, tmp_path):
    root, files, rows, tok, tokens = world
    out = tmp_path / "mixture=m"
    man = M.build("m", {"tg": 2.5, "omi2": 1}, tokens, out, seed=0)
    assert json.loads((out / M.MANIFEST).read_text()) == man
    eos = tok.eos_token_id
    tg = man["sources"]["tg"]
    assert (tg["copies"], tg["fraction"], tg["source_documents"]) == (2, 0.5, N["tg"])
    assert tg["documents"] == 2 * N["tg"] + N["tg"] // 2
    assert man["sources"]["omi2"]["documents"] == N["omi2"]
    assert man["documents"] == tg["documents"] + N["omi2"]
    assert man["tokenizer"]["vocab_size"] == len(tok) and man["tokenizer"]["eos_id"] == eos
    assert man["tokenizer"]["path"] == str(root / "tok") and man["dtype"] == "uint16"

    stream = M.TokenStream(out)
    tokens_read = stream.read(0, stream.n_tokens)
    assert stream.n_tokens == man["tokens"] == sum(s["tokens"] for s in man["sources"].values())
    got = _split_docs(tokens_read, eos)
    expected_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in _docs(rows["tg"])]
    assert got[:N["tg"]] == expected_ids and got[N["tg"]:2 * N["tg"]] == expected_ids    # two whole copies
    half = got[2 * N["tg"]:tg["documents"]]
    assert len(half) == N["tg"] // 2 and all(d in expected_ids for d in half)              # a subset of tg
    assert [tok.decode(d) for d in got[tg["documents"]:]] == _docs(rows["omi2"])
    assert all(d and d[0] != eos for d in got)                                              # no BOS
    # Whole copies are the source's own shard, read twice; the mixture stores only its subset.
    assert sorted(p.name for p in out.iterdir()) == [M.MANIFEST, "tg.part.000.bin"]
    tg_shard = [s["file"] for s in man["segments"] if s["source"] == "tg"][0]
    assert (out / tg_shard).resolve() == (tokens["tg"] / "tg.000.bin").resolve()
    assert [s["file"] for s in man["segments"]].count(tg_shard) == 2
    counts = np.bincount(tokens_read, minlength=len(tok))
    assert man["unigram_entropy"] == pytest.approx(M.unigram_entropy(counts))


def test_a_source_is_tokenized_once_for_every_mixture(world, tmp_path):
    root, files, rows, tok, tokens = world
    info = M.read_manifest(tokens["tg"])
    assert info["documents"] == N["tg"] and info["source"] == "tg"
    assert np.load(tokens["tg"] / M.LENGTHS).sum() == info["tokens"]
    a = M.build("a", {"tg": 1}, tokens, tmp_path / "a", seed=0)
    b = M.build("b", {"tg": 4, "omi2": 1}, tokens, tmp_path / "b", seed=0)
    assert not list((tmp_path / "a").glob("*.bin")) and not list((tmp_path / "b").glob("*.bin"))
    assert b["sources"]["tg"]["tokens"] == 4 * a["tokens"]
    one = M.TokenStream(tmp_path / "a")
    assert np.array_equal(M.TokenStream(tmp_path / "b").read(3 * one.n_tokens, one.n_tokens),
                          one.read(0, one.n_tokens))


def test_mixture_is_deterministic_and_the_seed_moves_the_fraction(world, tmp_path):
    root, files, _, tok, tokens = world
    M.tokenize_source("tg", files["tg"], tok, tmp_path / "tg7", batch_rows=7)              # other batching
    weights = {"tg": 0.5, "omi2": 1}
    a = M.build("m", weights, tokens, tmp_path / "a", seed=0)
    M.build("m", weights, {**tokens, "tg": tmp_path / "tg7"}, tmp_path / "b", seed=0)
    c = M.build("m", weights, tokens, tmp_path / "c", seed=1)
    read = lambda d: M.TokenStream(d).read(0, M.TokenStream(d).n_tokens)             # noqa: E731
    assert np.array_equal(read(tmp_path / "a"), read(tmp_path / "b"))
    assert not np.array_equal(read(tmp_path / "a"), read(tmp_path / "c"))
    assert a["sources"]["tg"]["documents"] == c["sources"]["tg"]["documents"] == N["tg"] // 2


def test_small_shards_read_as_the_same_stream(world, tmp_path):
    root, files, _, tok, tokens = world
    small = {src: tmp_path / f"small-{src}" for src in files}
    for src, path in files.items():
        M.tokenize_source(src, path, tok, small[src], shard_tokens=500, batch_rows=5)
    M.build("m", {"tg": 1.5, "omi2": 2}, tokens, tmp_path / "one", seed=0)
    M.build("m", {"tg": 1.5, "omi2": 2}, small, tmp_path / "many", seed=0)
    one, many = M.TokenStream(tmp_path / "one"), M.TokenStream(tmp_path / "many")
    assert len(list(small["tg"].glob("tg.*.bin"))) > 1
    assert one.n_tokens == many.n_tokens
    full = one.read(0, one.n_tokens)
    assert np.array_equal(full, many.read(0, many.n_tokens))
    for start, length in [(0, 64), (490, 37), (many.n_tokens - 10, 10)]:           # across shard boundaries
        assert np.array_equal(many.read(start, length), full[start:start + length])
    seqs = many.sequences([3, 0, 7], 64)
    assert seqs.shape == (3, 64) and seqs.dtype == np.int64
    assert np.array_equal(seqs[0], full[3 * 64:4 * 64]) and many.n_sequences(64) == many.n_tokens // 64


@pytest.mark.parametrize("seq_len", [24, 64, 200])  # shorter than most documents, about one, several
def test_document_windows_open_at_a_document_and_cover_the_stream(world, tmp_path, seq_len):
    root, files, _, tok, _ = world
    small = {src: tmp_path / f"small-{src}" for src in files}  # many shards: documents cross shard files
    for src, path in files.items():
        M.tokenize_source(src, path, tok, small[src], shard_tokens=300, batch_rows=7)
    M.build("m", {"tg": 1.5, "omi2": 2}, small, tmp_path / "mix", seed=0)
    stream, eos = M.TokenStream(tmp_path / "mix"), tok.eos_token_id
    full = stream.read(0, stream.n_tokens)
    docs = np.concatenate([[0], np.flatnonzero(full[:-1] == eos) + 1])
    assert np.array_equal(stream.document_starts(eos), docs)
    n = stream.n_sequences(seq_len)
    starts = stream.document_windows(seq_len, eos)
    assert len(starts) == n and starts.max() + seq_len <= stream.n_tokens
    for i, start in enumerate(starts):
        span = docs[(docs >= i * seq_len) & (docs < (i + 1) * seq_len)]
        # the first document that begins inside the window's span (a span inside one document stays put),
        # the last windows kept inside the stream
        assert start == min(span[0] if len(span) else i * seq_len, stream.n_tokens - seq_len)
        assert not len(span) or start == stream.n_tokens - seq_len or start == 0 or full[start - 1] == eos
    seqs = stream.sequences([2, 0], seq_len, starts)
    assert np.array_equal(seqs[0], full[starts[2]:starts[2] + seq_len])
    assert np.array_equal(seqs[1], full[:seq_len])


@pytest.mark.parametrize("seq_len", [24, 200])
def test_shuffled_documents_hold_the_same_documents_whole_in_a_seeded_order_across_sources(world, tmp_path, seq_len):
    root, files, _, tok, _ = world
    small = {src: tmp_path / f"small-{src}" for src in files}  # documents cross shard files
    for src, path in files.items():
        M.tokenize_source(src, path, tok, small[src], shard_tokens=300, batch_rows=7)
    M.build("m", {"tg": 1.5, "omi2": 2}, small, tmp_path / "mix", seed=0)
    stream, eos = M.TokenStream(tmp_path / "mix"), tok.eos_token_id
    shuffled = stream.shuffled(eos, seed=3)
    assert shuffled.n_tokens == stream.n_tokens and shuffled.n_sequences(seq_len) == stream.n_sequences(seq_len)
    before, after = (_split_docs(s.read(0, s.n_tokens), eos) for s in (stream, shuffled))
    assert sorted(map(tuple, after)) == sorted(map(tuple, before))      # every document once, whole
    assert after != before
    tg_stream = M.TokenStream(small["tg"])
    tg = {tuple(d) for d in _split_docs(tg_stream.read(0, tg_stream.n_tokens), eos)}
    kinds = [tuple(d) in tg for d in after]
    assert sum(a != b for a, b in zip(kinds, kinds[1:])) > len(kinds) // 4  # the sources are interleaved
    full = shuffled.read(0, shuffled.n_tokens)
    for start, length in [(0, 64), (137, 300), (shuffled.n_tokens - 10, 10)]:   # across document boundaries
        assert np.array_equal(shuffled.read(start, length), full[start:start + length])
    assert np.array_equal(shuffled.document_starts(eos), np.concatenate([[0], np.flatnonzero(full[:-1] == eos) + 1]))
    starts = shuffled.document_windows(seq_len, eos)
    assert np.array_equal(shuffled.sequences([1], seq_len, starts)[0], full[starts[1]:starts[1] + seq_len])
    assert np.array_equal(stream.shuffled(eos, seed=3).read(0, 500), full[:500])     # seeded
    assert not np.array_equal(stream.shuffled(eos, seed=4).read(0, 500), full[:500])


def test_missing_source_file_or_tokens_stop_with_one_sentence_naming_the_path(world, tmp_path):
    root, files, _, tok, tokens = world
    missing = tmp_path / "data" / "source=omi1" / "train.parquet"
    with pytest.raises(M.MixtureError) as err:
        M.tokenize_source("omi1", missing, tok, tmp_path / "tokens")
    msg = str(err.value)
    assert str(missing) in msg and "omi1" in msg and "\n" not in msg
    assert not (tmp_path / "tokens").exists()
    nowhere = tmp_path / "tokens" / "source=omi1"
    with pytest.raises(M.MixtureError, match=str(nowhere)):
        M.build("m", {"tg": 1, "omi1": 1}, {**tokens, "omi1": nowhere}, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_unreadable_source_and_damaged_tokens_are_reported_by_path(world, tmp_path):
    root, files, _, tok, tokens = world
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(M.MixtureError, match=str(bad)):
        M.tokenize_source("tg", bad, tok, tmp_path / "bad-tokens")
    M.tokenize_source("tg", files["tg"], tok, tmp_path / "tg")
    M.build("m", {"tg": 1}, {"tg": tmp_path / "tg"}, tmp_path / "ok", seed=0)
    shard = tmp_path / "tg" / "tg.000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(M.MixtureError, match="token shard .*tg.000.bin is missing or truncated"):
        M.TokenStream(tmp_path / "ok")
    (tmp_path / "tg" / M.COUNTS).unlink()
    with pytest.raises(M.MixtureError, match=str(tmp_path / "tg" / M.COUNTS)):
        M.build("m", {"tg": 1}, {"tg": tmp_path / "tg"}, tmp_path / "ok2", seed=0)
    with pytest.raises(M.MixtureError, match=str(tmp_path / "nowhere")):
        M.TokenStream(tmp_path / "nowhere")


def test_sources_tokenized_with_different_tokenizers_do_not_mix(world, tmp_path):
    root, files, _, tok, tokens = world
    other = ec_tokenizer.train_bpe(ec_tokenizer.documents([files["omi2"]]), 280)
    M.tokenize_source("omi2", files["omi2"], other, tmp_path / "omi2")
    with pytest.raises(M.MixtureError, match="another tokenizer"):
        M.build("m", {"tg": 1, "omi2": 1}, {**tokens, "omi2": tmp_path / "omi2"}, tmp_path / "out", seed=0)
