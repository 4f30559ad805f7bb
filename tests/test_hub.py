"""The real-dataset loaders, run on small local files written with each dataset's real column names."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from echochamber import config as ec_config
from echochamber.data import hub, sources
from echochamber.data.synthetic import SCHEMA
from echochamber.formats import document

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of these tests out of the user's HF cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def write_parquet(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict], opener=open) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def load(loader: str, path: str, **extra) -> dict[str, list[dict]]:
    return hub.load_splits(loader, {"kind": "hub", "loader": loader, "path": path, **extra})


def test_every_loader_reads_its_real_columns_into_the_schema(tmp_path):
    files = {
        "finemath": write_parquet(tmp_path / "fm.parquet", [
            {"url": "u", "text": "# Fractions\n\nHalf of 8 is 4.\n\nSo 8 / 2 = 4.", "score": 3.1, "int_score": 3},
            {"url": "v", "text": "   ", "score": 3.0, "int_score": 3}]),
        "algebraic_stack": write_jsonl(tmp_path / "as.jsonl.gz", [
            {"text": "def f(x):\n    return x + 1", "meta": {"lang": "python"}}], opener=gzip.open),
        "tinygsm": write_parquet(tmp_path / "tg.parquet", [
            {"question": "Ann has 3 pens and buys 2.", "code": "def simple_math_problem() -> int:\n"
                                                                 "    result = 3 + 2\n    return result"}]),
        "omi1": write_jsonl(tmp_path / "omi1.jsonl", [
            {"question": "What is 2+3?", "generated_solution": "<llm-code>\n2+3\n</llm-code>\n"
             "<llm-code-output>\n5\n</llm-code-output>\nSo \\boxed{5}.", "expected_answer": "5",
             "predicted_answer": "5", "is_correct": True, "error_message": "", "dataset": "gsm8k",
             "generation_type": "masked_reference_solution"},
            {"question": "What is 2+2?", "generated_solution": "\\boxed{5}", "expected_answer": "4",
             "predicted_answer": "5", "is_correct": False, "error_message": "", "dataset": "gsm8k",
             "generation_type": "without_reference_solution"}]),
        "omi2": write_parquet(tmp_path / "omi2.parquet", [
            {"problem": "Compute $1+1$.", "generated_solution": "We add: $1+1=2$. \\boxed{2}",
             "expected_answer": "2", "problem_source": "augmented_math"}]),
        "metamathqa": write_jsonl(tmp_path / "mmqa.json", [
            {"query": "Tom has 5 apples and eats 2. How many are left?",
             "response": "5 - 2 = 3.\nThe answer is: 3", "type": "GSM_Rephrased",
             "original_question": "Tom has 5 apples..."}]),
        "gsm8k": write_parquet(tmp_path / "gsm8k.parquet", [
            {"question": "Sam earns $1,200 a week. How much in 2 weeks?",
             "answer": "Sam earns 1200*2=<<1200*2=2400>>2400.\n#### 2,400"}]),
        "math500": write_jsonl(tmp_path / "math500.jsonl", [
            {"problem": "Find $x$ if $2x=6$.", "solution": "$x=\\boxed{3}$.", "answer": "3",
             "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"}]),
        "aime": write_jsonl(tmp_path / "aime.jsonl", [
            {"id": 60, "problem": "Find the remainder.", "solution": "... so \\boxed{204}.", "answer": "204",
             "url": "https://artofproblemsolving.com/wiki"}]),
    }
    assert set(files) == set(hub.LOADERS)
    got = {name: load(name, path) for name, path in files.items()}
    for name, splits in got.items():
        assert set(splits) == {"train", "test", "hard"}, name
        for split, rows in splits.items():
            # every row fits the shared schema exactly
            pa.Table.from_pylist(rows, schema=SCHEMA)
            assert all(r["split"] == split and r["source"] == name for r in rows)

    fm = got["finemath"]["train"]
    assert len(fm) == 1 and fm[0]["question"] == "# Fractions"  # the blank document is dropped
    assert document(fm[0]["question"], fm[0]["solution"]) == "# Fractions\n\nHalf of 8 is 4.\n\nSo 8 / 2 = 4."
    st = got["algebraic_stack"]["train"]
    assert st[0]["question"] == "" and st[0]["solution"] == "def f(x):\n    return x + 1"
    assert got["tinygsm"]["train"][0]["solution"].startswith("def simple_math_problem() -> int:")
    omi1 = got["omi1"]["train"]
    assert [r["question"] for r in omi1] == ["What is 2+3?"] and omi1[0]["answer"] == "5"
    assert got["omi2"]["train"][0]["answer"] == "2"
    assert got["metamathqa"]["train"][0]["answer"] == "3"
    g = got["gsm8k"]["train"][0]
    assert g["answer"] == "2400" and g["solution"].endswith("#### 2,400")
    m = got["math500"]
    assert m["train"] == [] and m["test"][0]["difficulty"] == 2 and m["test"][0]["id"] == "test/algebra/1.json"
    a = got["aime"]
    assert a["train"] == [] and a["test"][0]["answer"] == "204" and a["test"][0]["id"] == "60"
    for name in ("finemath", "tinygsm", "omi1", "omi2", "metamathqa"):
        assert got[name]["test"] == [] and got[name]["hard"] == []


def test_folder_with_split_files_gives_gsm8k_train_and_test(tmp_path):
    folder = tmp_path / "gsm8k"
    write_parquet(folder / "train.parquet", [{"question": f"q{i}", "answer": f"s\n#### {i}"} for i in range(5)])
    write_parquet(folder / "test.parquet", [{"question": "t", "answer": "s\n#### 7"}])
    splits = load("gsm8k", str(folder))
    assert [r["answer"] for r in splits["train"]] == ["0", "1", "2", "3", "4"]
    assert [r["answer"] for r in splits["test"]] == ["7"] and splits["hard"] == []
    assert [r["id"] for r in splits["train"]][:2] == ["gsm8k-train-0", "gsm8k-train-1"]
    # slices, other hub splits and files per split through `splits`
    hard = write_jsonl(tmp_path / "hard.jsonl", [{"question": "h", "answer": "x\n#### 9"}])
    splits = load("gsm8k", str(folder), splits={"train": "train[:2]", "hard": hard, "test": ""})
    assert len(splits["train"]) == 2 and splits["test"] == [] and splits["hard"][0]["answer"] == "9"


def test_hub_snapshot_folder_uses_the_loaders_config(tmp_path):
    """A `hf download` of FineMath holds several configs; the loader picks finemath-3plus."""
    snap = tmp_path / "finemath"
    snap.mkdir()
    (snap / "README.md").write_text(
        "---\nconfigs:\n- config_name: finemath-3plus\n  data_files:\n  - split: train\n"
        "    path: finemath-3plus/*.parquet\n- config_name: finemath-4plus\n  data_files:\n"
        "  - split: train\n    path: finemath-4plus/*.parquet\n---\n# FineMath\n")
    write_parquet(snap / "finemath-3plus" / "train-00000.parquet", [{"text": "three plus"}])
    write_parquet(snap / "finemath-4plus" / "train-00000.parquet", [{"text": "four plus"}])
    rows = load("finemath", str(snap))["train"]
    assert [r["solution"] for r in rows] == ["three plus"]


@pytest.mark.parametrize("streaming", [None, False, True])
def test_max_docs_caps_each_split_after_filtering(tmp_path, streaming):
    rows = [{"question": f"q{i}", "generated_solution": f"s{i}", "expected_answer": str(i),
             "is_correct": i % 2 == 0} for i in range(20)]
    path = write_parquet(tmp_path / "omi1.parquet", rows)
    extra = {"max_docs": 3} | ({} if streaming is None else {"streaming": streaming})
    got = load("omi1", path, **extra)["train"]
    assert [r["answer"] for r in got] == ["0", "2", "4"]


def test_split_document_round_trips_through_formats_document():
    for text in ["Title\n\nBody one.\n\nBody two.", "no blank line\nat all", "  lead\n\n\n\nstill fine \n",
                 "a\n\n\nb\n\nc", "x"]:
        q, s = hub.split_document(text)
        assert (document(q, s) if q else s) == text.strip()
        assert q == q.strip() and s == s.strip()
    assert hub.split_document("a\n\n\nb\n\nc") == ("a\n\n\nb", "c")


def test_answer_helpers():
    assert hub.gsm8k_gold("work\n#### 1,234") == "1234"
    assert hub.gsm8k_gold("no marker") == ""
    assert hub.metamath_answer("steps\nThe answer is: \\frac{1}{2}") == "\\frac{1}{2}"
    assert hub.metamath_answer("no final line") == ""


def test_wrong_columns_say_which_dataset_and_what_it_needs(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(hub.HubError, match=r"dataset mmqa .*no column 'query', 'response'.*meta-math/MetaMathQA"):
        hub.load_splits("mmqa", {"kind": "hub", "loader": "metamathqa", "path": path})


def test_missing_local_file_names_the_config_field(tmp_path):
    with pytest.raises(hub.HubError, match=r"data\.sources\.gsm\.path: local file .*missing\.parquet does not exist"):
        hub.load_splits("gsm", {"kind": "hub", "loader": "gsm8k", "path": str(tmp_path / "missing.parquet")})


def test_unreachable_hub_names_the_dataset_and_the_local_path_setting(tmp_path):
    """Offline (as on a cluster node without internet), the error says what to set instead."""
    code = ("from echochamber.data import hub\n"
            "try:\n    hub.load_splits('tg', {'kind': 'hub', 'loader': 'tinygsm'})\n"
            "except hub.HubError as e:\n    print('HUBERROR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "HUBERROR" in out.stdout, out.stderr[-2000:]
    msg = out.stdout.split("HUBERROR", 1)[1].strip()
    assert "dataset tg" in msg and "'TinyGSM/TinyGSM'" in msg and "data.sources.tg.path" in msg
    assert "\n" not in msg


def test_write_splits_streams_the_same_rows_to_parquet(tmp_path):
    path = write_parquet(tmp_path / "gsm8k" / "train.parquet",
                         [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(7)])
    write_parquet(tmp_path / "gsm8k" / "test.parquet", [{"question": "t", "answer": "#### 1"}])
    spec = {"kind": "hub", "loader": "gsm8k", "path": str(Path(path).parent)}
    outputs = {s: str(tmp_path / "out" / f"{s}.parquet") for s in ("train", "test", "hard")}
    counts = hub.write_splits("gsm8k", spec, outputs, batch_rows=3)
    assert counts == {"train": 7, "test": 1, "hard": 0}
    expected = hub.load_splits("gsm8k", spec)
    for split, out in outputs.items():
        table = pq.read_table(out)
        assert table.schema.equals(SCHEMA) and table.to_pylist() == expected[split]


def test_data_stage_builds_a_hub_source_from_a_config(tmp_path):
    """The config validates with a hub source, and the data stage writes its splits."""
    train = write_jsonl(tmp_path / "tg.jsonl", [{"question": "q", "code": "def f():\n    return 1"}])
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["data"]["sources"]["tg"] = {"kind": "hub", "loader": "tinygsm", "path": train, "max_docs": 10}
    ec_config.validate(cfg)
    spec = sources.source_spec(cfg, "tg")
    outputs = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "test", "hard")}
    assert sources.build("tg", spec, outputs) == {"train": 1, "test": 0, "hard": 0}
    assert pq.read_table(outputs["train"]).column("solution").to_pylist() == ["def f():\n    return 1"]
    cfg["data"]["sources"]["tg"] = {"kind": "hub", "loader": "tinygsm", "splits": {"dev": "x"}}
    with pytest.raises(ec_config.ConfigError, match="data.sources.tg.splits"):
        ec_config.validate(cfg)


def test_proof_pile_snapshot_is_read_from_its_files_not_its_loading_script(tmp_path):
    """proof-pile-2 ships a loading script (refused by datasets >= 4): the loader reads the JSON lines."""
    snap = tmp_path / "proof-pile-2"
    snap.mkdir()
    (snap / "proof-pile-2.py").write_text("raise SystemExit('a loading script must never run')\n")
    (snap / "README.md").write_text("# Proof-Pile-2\n")
    for split, lang in (("train", "python"), ("train", "julia"), ("test", "python")):
        write_jsonl(snap / "algebraic-stack" / split / f"{lang}-{split}-0000.jsonl.gz",
                    [{"text": f"{lang} {split}", "meta": {}}], opener=gzip.open)
    write_jsonl(snap / "open-web-math" / "train" / "owm-0000.jsonl.gz", [{"text": "web", "meta": {}}],
                opener=gzip.open)
    got = load("algebraic_stack", str(snap), splits={"test": "test"})
    assert sorted(r["solution"] for r in got["train"]) == ["julia train", "python train"]
    assert [r["solution"] for r in got["test"]] == ["python test"]
    with pytest.raises(hub.HubError, match=r"data\.sources\.algebraic_stack\.splits: 'dev' is not a split"):
        load("algebraic_stack", str(snap), splits={"train": "dev"})
