"""The data stage through the real workflow: parquet files and tokenizer, then nothing to redo."""

import pyarrow.parquet as pq

from conftest import snakemake
from echochamber import grid
from echochamber.data import tokenizer


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
