"""The data stage through the real workflow: parquet files and tokenizer, then nothing to redo."""

import re

import pyarrow.parquet as pq
import pytest

from conftest import snakemake
from echochamber import evaluate, grid
from echochamber.data import mixture, tokenizer
from echochamber.rl import train


def test_data_stage_end_to_end(tiny, tmp_path):
    path, cfg = tiny
    res = tmp_path / "results"
    targets = [str(res / "tokenizer" / "tokenizer_config.json")] + [
        str(res / "data" / f"source={s}" / f"{split}.parquet")
        for s in grid.sources_needed(cfg) for split in grid.SPLITS]
    first = snakemake("--cores", "2", f"--configfile={path}", *targets, cwd=tmp_path)
    out = first.stdout + first.stderr
    assert "Results are under" in out
    # it ends with where the time went: a row per stage that ran, from the job benchmarks
    breakdown = out[out.index("Where the time went"):]
    assert [line.split()[0] for line in breakdown.splitlines()[2:4]] == ["data", "tokenizer"]
    assert "total" in breakdown
    for s in grid.sources_needed(cfg):
        train = pq.read_table(res / "data" / f"source={s}" / "train.parquet").to_pylist()
        assert len(train) == 120 and {r["source"] for r in train} == {s}
        assert (res / "logs" / "data" / f"source={s}.log").exists()
    tok = tokenizer.load(res / "tokenizer")
    assert tok.eos_token == tokenizer.EOS and tok.pad_token == tokenizer.PAD
    text = "Ava has 12 apples.\n\ndef simple_math_problem() -> int:"
    assert tok.decode(tok(text).input_ids) == text
    assert [tok.convert_ids_to_tokens(i) for i in tok("123").input_ids] == ["1", "2", "3"]

    again = snakemake("--cores", "2", f"--configfile={path}", *targets, cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr

    # a truncated source file: the tokenizer job stops with one sentence; its advice, followed, works
    source = res / "data" / "source=tg" / "train.parquet"
    with source.open("r+b") as f:
        f.truncate(source.stat().st_size // 2)
    failed = snakemake("--cores", "2", f"--configfile={path}", *targets, cwd=tmp_path, check=False)
    said = re.findall(r"^Data error: (.+)$", failed.stdout + failed.stderr, re.MULTILINE)
    assert failed.returncode != 0 and said == [f"source file {source} is not a readable parquet file "
                                                f"(ArrowInvalid); delete it and run snakemake again: rule source "
                                                f"writes it"], (failed.stdout + failed.stderr)[-3000:]
    source.unlink()
    snakemake("--cores", "2", f"--configfile={path}", *targets, cwd=tmp_path)
    assert len(pq.read_table(source)) == 120


@pytest.mark.parametrize("reader", ["tokenizer", "tokens", "benchmark", "prompts"])
def test_every_stage_reading_a_truncated_source_file_says_so_in_one_sentence(reader, tmp_path):
    from echochamber.data import synthetic

    path = tmp_path / "test.parquet"
    synthetic.write_parquet(synthetic.generate("gsm8k", "gsm8k", "test", 50, seed=0,
                                               difficulty=synthetic.Difficulty()), path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)
    read, error = {
        "tokenizer": (lambda: list(tokenizer.documents([path])), tokenizer.SourceError),
        "tokens": (lambda: mixture._n_rows(path), mixture.MixtureError),
        "benchmark": (lambda: evaluate.load_benchmark(path), evaluate.EvalError),
        "prompts": (lambda: train.load_prompts(path), train.RLInputError),
    }[reader]
    with pytest.raises(error) as e:
        read()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert msg.endswith("delete it and run snakemake again: rule source writes it")
