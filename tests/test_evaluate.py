"""Evaluation: pass@k / maj@k against hand-computed cases, and the checkpoint loop on a tiny real model."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from math import comb

import pyarrow.parquet as pq
import pytest

from echochamber import evaluate as ev
from echochamber import manifest
from echochamber.data import synthetic
from echochamber.formats import FORMATS, document

# ------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 1 - 3 / 6),          # 1 - C(3,2)/C(4,2)
    (5, 2, 3, 1 - 1 / 10),         # 1 - C(3,3)/C(5,3)
    (4, 0, 4, 0.0),                # k = n, nothing correct
    (4, 1, 4, 1.0),                # k = n, one correct: every draw of all n holds it
    (4, 4, 1, 1.0),
    (10, 3, 1, 0.3),               # pass@1 is the share correct
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) has ~600 digits: a float ratio overflows, the product form does not
    n, c, k = 2000, 3, 1000
    exact = 1 - comb(n - c, k) / comb(n, k)     # Python integers are exact
    assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    assert ev.pass_at_k(64, 1, 64) == 1.0 and ev.pass_at_k(64, 1, 1) == pytest.approx(1 / 64)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        ev.pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------ maj@k


def test_maj_at_k_hand_computed():
    # k = n: one vote over all samples
    assert ev.maj_at_k(["3", "3", "5", None], [True, True, False, False], 4) == 1.0
    assert ev.maj_at_k(["5", "5", "3", "3", "3"], [False, False, True, True, True], 5) == 1.0
    assert ev.maj_at_k(["5", "5", "5", "3", "3"], [False, False, False, True, True], 5) == 0.0
    # unparsable answers never win, even with the most votes: the tie 5 / 3 is worth 1/2
    assert ev.maj_at_k(["5", None, None, "3"], [False, False, False, True], 4) == 0.5
    assert ev.maj_at_k([None, None, None, "7"], [False, False, False, True], 4) == 1.0
    # nothing parses: the vote is wrong
    assert ev.maj_at_k([None, None], [False, False], 2) == 0.0
    # k < n: the n // k disjoint groups of k, averaged
    assert ev.maj_at_k(["1", "1", "2", "2"], [True, True, False, False], 2) == 0.5
    assert ev.maj_at_k(["1", "2", "1", "1", "9"], [True, False, True, True, False], 2) == pytest.approx(
        (0.5 + 1.0) / 2)  # last sample unused
    # k = 1: the share correct, unparsable wrong
    assert ev.maj_at_k(["1", None, "2"], [True, False, False], 1) == pytest.approx(1 / 3)


def test_votes_pool_spellings_of_one_number():
    assert ev.normalize_answer(" 12.0 ") == "12" == ev.normalize_answer("12")
    assert ev.normalize_answer("1,200") == "1200" and ev.normalize_answer("$5") == "5"
    assert ev.normalize_answer("") is None and ev.normalize_answer(None) is None
    assert ev.normalize_answer(float("nan")) is None
    assert ev.normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    # 12 and 12.0 are one answer: 2 votes beat 7's single vote
    assert ev.maj_at_k(["12", "7", "12.0"], [True, False, True], 3) == 1.0


def test_maj_at_k_rejects_bad_k():
    with pytest.raises(ValueError):
        ev.maj_at_k(["1"], [True], 2)
    with pytest.raises(ValueError):
        ev.maj_at_k(["1", "2"], [True], 1)


def _rec(correct, fmt, answer, n_tokens=10, truncated=False):
    return {"correct": correct, "format": fmt, "answer": answer, "n_tokens": n_tokens, "truncated": truncated}


def test_summarize_hand_computed():
    greedy = [_rec(True, "tinygsm", "4"), _rec(False, "text", "1")]
    samples = [[_rec(True, "tinygsm", "4", 8), _rec(False, "text", None, 12, True)],
               [_rec(False, "text", "1"), _rec(False, "text", "2")]]
    m = ev.summarize(greedy, samples, k=2)
    assert m["n_problems"] == 2 and m["n_samples"] == 2 and m["k"] == 2
    assert m["pass1"] == 0.5
    assert m["pass_k"] == 0.5          # problem 1: c=1 of n=2, k=2 -> 1; problem 2 -> 0
    assert m["maj_k"] == 0.5           # problem 1: only "4" parses -> right; problem 2: tie of wrong -> 0
    assert m["mean_acc"] == 0.25
    assert (m["share_tinygsm"], m["share_omi1"], m["share_text"]) == (0.25, 0.0, 0.75)
    assert m["acc_tinygsm"] == 1.0 and m["acc_text"] == 0.0 and math.isnan(m["acc_omi1"])
    assert m["unparsable_rate"] == 0.25 and m["trunc_rate"] == 0.25 and m["response_len"] == 10.0
    assert set(m) | {"step", "temperature", "top_p"} == set(ev.METRIC_COLUMNS)


def test_settings_and_config_checks():
    with pytest.raises(ev.EvalError, match="eval.k"):
        ev.EvalSettings(n_samples=2, k=4)
    with pytest.raises(ev.EvalError, match=r"eval.k \(8\) must not exceed eval.n_samples \(4\)"):
        ev.check_config({"eval": {"n_samples": 4, "k": 8}})
    cfg = {"seed": 3, "eval": {"benchmarks": {"t": {"source": "gsm8k"}}, "n_samples": 2, "k": 2,
                               "max_new_tokens": 9}}
    s = ev.settings_from_config(cfg, seed=1)
    assert s["n_samples"] == 2 and s["max_new_tokens"] == 9 and s["seed"] == 3001
    assert ev.EvalSettings(**s).k == 2
    assert ev.benchmarks(cfg) == {"t": {"source": "gsm8k", "split": "test", "checkpoints": "all"}}


# ------------------------------------------------------------------------------------------ a tiny model


@dataclass
class FakeVerdict:
    correct: bool
    format: str
    answer: str | None
    error: str | None = None


def fake_scorer(completions, golds):
    """Deterministic and independent of the real reward: the answer is the completion's length mod 3."""
    out = []
    for c in completions:
        ans = None if len(c) % 5 == 0 else str(len(c) % 3)
        out.append(FakeVerdict(ans == "1", "bogus-format", ans))   # format falls back to classify()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    from echochamber.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("eval")
    diff = synthetic.Difficulty()
    docs = []
    for render in ("tinygsm", "omi1", "omi2"):
        for r in synthetic.generate(source=render, render=render, split="train", n=40, difficulty=diff, seed=0):
            docs.append(document(r["question"], r["solution"]))
    tok = train_bpe(docs, vocab_size=400)
    bench = root / "data" / "test.parquet"
    bench.parent.mkdir(parents=True)
    rows = synthetic.generate(source="gsm8k", render="gsm8k", split="test", n=5, difficulty=diff, seed=0)
    synthetic.write_parquet(rows, bench)

    def save(path, seed):
        torch.manual_seed(seed)
        cfg = OlmoConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
        OlmoForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        manifest.write(path)
        return path

    rl = root / "rl"
    ckpts = {s: save(rl / "checkpoints" / f"step={s}", s) for s in (0, 3, 7)}
    manifest.write_set(rl / "checkpoints", [0, 3, 7])
    return {"root": root, "tok": tok, "bench": bench, "rl": rl, "ckpts": ckpts, "docs": docs}


SETTINGS = dict(n_samples=3, k=2, temperature=1.0, top_p=0.95, max_new_tokens=10, batch_size=8, seed=5)


def test_encode_prompt_matches_the_tokens_inside_a_document(world):
    tok = world["tok"]
    q = "Ava has 3 apples. Ava gets 2 more apples. How many apples does Ava have now?"
    sol = "def simple_math_problem() -> int:\n    return 5"
    ids = ev.encode_prompt(tok, q)
    in_doc = tok(document(q, sol), add_special_tokens=False)["input_ids"]
    assert in_doc[:len(ids)] == ids and tok.decode(ids) == q + "\n\n"
    # where the vocabulary merges a blank line into one token, encoding the prompt alone would end in
    # that token, which the documents never show before a solution
    bpe = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else None
    if bpe is not None and bpe.token_to_id("\u010a\u010a") is not None:
        alone = tok(q + "\n\n", add_special_tokens=False)["input_ids"]
        assert alone != ids and in_doc[:len(alone)] != alone


def test_find_checkpoints_skips_the_base_step(world, tmp_path):
    found = ev.find_checkpoints(world["rl"])
    assert list(found) == [3, 7] and found[3].name == "step=3"
    assert list(ev.find_checkpoints(world["rl"], skip_steps=())) == [0, 3, 7]
    with pytest.raises(ev.EvalError, match="checkpoints does not exist"):
        ev.find_checkpoints(tmp_path)
    only_base = tmp_path / "only_base" / "checkpoints"
    shutil.copytree(world["ckpts"][0], only_base / "step=0")
    manifest.write_set(only_base, [0])
    with pytest.raises(ev.EvalError, match="no checkpoints"):
        ev.find_checkpoints(only_base.parent)


def test_find_checkpoints_takes_the_steps_from_the_manifest(world, tmp_path):
    """A deleted step stops the evaluation (never a shorter curve); a stray step folder is not evaluated."""
    rl = tmp_path / "rl"
    shutil.copytree(world["rl"], rl)
    shutil.copytree(world["ckpts"][3], rl / "checkpoints" / "step=9")      # not in the manifest
    assert list(ev.find_checkpoints(rl)) == [3, 7]
    shutil.rmtree(rl / "checkpoints" / "step=3")
    assert list(ev.find_checkpoints(rl, which="last")) == [7]         # only the evaluated step is checked
    with pytest.raises(ev.EvalError) as e:
        ev.find_checkpoints(rl)
    assert str(e.value) == (f"checkpoint {rl}/checkpoints/step=3 is missing though {rl}/checkpoints/manifest.json "
                            f"lists it; delete the folder {rl}/checkpoints and run snakemake again to rewrite it")


def test_base_checkpoint_is_step_0_verified(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world["ckpts"][0], model)
    assert ev.base_checkpoint(model) == {0: model}
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                    # same size, other bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ev.EvalError, match=f"sha256 of model.safetensors differs.*delete the folder {model} "):
        ev.base_checkpoint(model)


def test_find_checkpoints_last_keeps_only_the_final_step(world):
    found = ev.find_checkpoints(world["rl"], which="last")
    assert list(found) == [7] and found[7].name == "step=7"
    with pytest.raises(ev.EvalError, match="checkpoints"):
        ev.find_checkpoints(world["rl"], which="first")


def test_evaluate_checkpoints_writes_consistent_metrics_and_generations(world, tmp_path):
    ckpts = ev.find_checkpoints(world["rl"])
    out_m, out_g = tmp_path / "metrics.parquet", tmp_path / "generations.parquet"
    rows = ev.evaluate_checkpoints(ckpts, world["bench"], SETTINGS, out_m, out_g, scorer=fake_scorer)
    metrics = pq.read_table(out_m).to_pandas()
    gens = pq.read_table(out_g).to_pandas()
    assert list(metrics.columns) == list(ev.METRIC_COLUMNS) and list(gens.columns) == list(ev.GENERATION_COLUMNS)
    assert list(metrics["step"]) == [3, 7] and [r["step"] for r in rows] == [3, 7]
    assert len(gens) == 2 * 5 * (1 + 3)                      # steps x problems x (greedy + samples)
    assert set(gens["format"]) <= set(FORMATS)
    for step, m in metrics.set_index("step").iterrows():
        g = gens[gens["step"] == step]
        greedy, samples = g[g["kind"] == "greedy"], g[g["kind"] == "sample"]
        assert m["pass1"] == pytest.approx(greedy["correct"].mean())
        assert m["mean_acc"] == pytest.approx(samples["correct"].mean())
        per = samples.groupby("problem_id")["correct"].sum()
        assert m["pass_k"] == pytest.approx(sum(ev.pass_at_k(3, int(c), 2) for c in per) / 5)
        assert sum(m[f"share_{f}"] for f in FORMATS) == pytest.approx(1.0)
        assert m["n_problems"] == 5 and m["k"] == 2 and m["temperature"] == 1.0
        assert (samples["n_tokens"] <= 10).all() and (samples["n_tokens"] >= 1).all()
        # the scorer's verdicts are what is kept
        redo = fake_scorer(list(g["completion"]), list(g["gold"]))
        assert list(g["correct"]) == [v.correct for v in redo]
    # golds come from the benchmark file
    bench = pq.read_table(world["bench"]).to_pandas()
    assert set(gens["gold"]) <= set(bench["answer"])
    # seeded: a second run gives the same generations; samples differ from one another
    ev.evaluate_checkpoints(ckpts, world["bench"], SETTINGS, tmp_path / "m2.parquet", tmp_path / "g2.parquet",
                            scorer=fake_scorer)
    assert pq.read_table(tmp_path / "g2.parquet").to_pandas()["completion"].tolist() == gens["completion"].tolist()
    first = gens[(gens["step"] == 3) & (gens["kind"] == "sample")]
    assert first["completion"].nunique() > 1


def test_keep_samples_and_max_problems(world, tmp_path):
    s = dict(SETTINGS, keep_samples=1, max_problems=2)
    ev.evaluate_checkpoints({0: world["ckpts"][0]}, world["bench"], s, tmp_path / "m.parquet",
                            tmp_path / "g.parquet", scorer=fake_scorer)
    gens = pq.read_table(tmp_path / "g.parquet").to_pandas()
    assert len(gens) == 2 * 2 and list(gens["kind"]) == ["greedy", "sample"] * 2
    m = pq.read_table(tmp_path / "m.parquet").to_pandas()
    assert m["n_problems"].tolist() == [2] and m["n_samples"].tolist() == [3] and m["step"].tolist() == [0]


def test_real_reward_scores_the_generations(world, tmp_path):
    # with the project's reward (when it is importable) the loop runs end to end
    pytest.importorskip("echochamber.reward")
    s = dict(SETTINGS, max_problems=2, n_samples=2)
    rows = ev.evaluate_checkpoints({0: world["ckpts"][0]}, world["bench"], s, tmp_path / "m.parquet",
                                   tmp_path / "g.parquet")
    gens = pq.read_table(tmp_path / "g.parquet").to_pandas()
    assert len(rows) == 1 and len(gens) == 2 * 3 and set(gens["format"]) <= set(FORMATS)
    assert 0.0 <= rows[0]["pass1"] <= 1.0


def test_user_mistakes_are_one_sentence_naming_the_file(world, tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ev.EvalError) as e:
        ev.evaluate_checkpoints({1: bad}, world["bench"], SETTINGS, tmp_path / "m.parquet", tmp_path / "g.parquet",
                                scorer=fake_scorer)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "m.parquet").exists() and not (tmp_path / "g.parquet").exists()
    with pytest.raises(ev.EvalError, match="does not exist"):
        ev.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ev.EvalError, match=r"benchmark file .*missing\.parquet does not exist"):
        ev.load_benchmark(tmp_path / "missing.parquet")
    pq.write_table(pq.read_table(world["bench"]).drop(["answer"]), tmp_path / "noanswer.parquet")
    with pytest.raises(ev.EvalError, match="lacks the column"):
        ev.load_benchmark(tmp_path / "noanswer.parquet")


# ------------------------------------------------------------------------------------------ the workflow


@pytest.mark.slow
def test_workflow_evaluates_ingests_and_reports(world, tmp_path):
    """rules/evaluate.smk + rules/results.smk on fake pretrain/RL outputs with tiny real checkpoints."""
    import shutil
    import subprocess
    import sys

    import duckdb
    import yaml

    from conftest import ROOT, SNAKEMAKE, tiny_config
    from test_store import write_fake_results

    for name in ("rules", "workflow_scripts", "src", "queries"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        'include: "rules/common.smk"\ninclude: "rules/evaluate.smk"\ninclude: "rules/results.smk"\n'
        'rule all:\n    input: eval_outputs(), results_outputs()\n')
    res = tmp_path / "results"
    cfg = tiny_config(res)
    cfg["grid"] = {"mixtures": ["as_fm3_tg_omi1_omi2"], "scales": ["s"], "seeds": [0], "algos": {"ppo": {"kl": [0.0]}}}
    # hard: only each RL cell's last checkpoint (the base model is always step 0)
    cfg["eval"] = {"benchmarks": {"test": {"source": "gsm8k", "split": "test"},
                                  "hard": {"source": "gsm8k", "split": "hard", "checkpoints": "last"}},
                   "max_problems": 3, "n_samples": 2, "k": 2, "temperature": 0.7, "top_p": 0.95,
                   "max_new_tokens": 8, "batch_size": 16}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cell = {"mixture": "as_fm3_tg_omi1_omi2", "scale": "s", "algo": "ppo", "kl": 0.0, "seed": 0}
    write_fake_results(res, [cell], benchmarks=())
    shutil.copytree(world["ckpts"][0], res / "pretrain/mixture=as_fm3_tg_omi1_omi2/scale=s/seed=0/model")
    rl = res / "rl/mixture=as_fm3_tg_omi1_omi2/scale=s/algo=ppo/kl=0/seed=0"
    shutil.copytree(world["ckpts"][0], rl / "checkpoints/step=1")
    shutil.copytree(world["ckpts"][3], rl / "checkpoints/step=2")
    manifest.write_set(rl / "checkpoints", [1, 2])
    (res / "data/source=gsm8k").mkdir(parents=True)
    shutil.copy(world["bench"], res / "data/source=gsm8k/test.parquet")
    shutil.copy(world["bench"], res / "data/source=gsm8k/hard.parquet")

    def run(*extra):
        proc = subprocess.run([SNAKEMAKE, "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path), "--cores", "2",
                               *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run()
    db = res / "echo.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT algo, benchmark, step, n_problems FROM evals "
                           "ORDER BY algo, benchmark, step").fetchall()
        assert rows == [("base", "hard", 0, 3), ("base", "test", 0, 3),
                        ("ppo", "hard", 2, 3), ("ppo", "test", 1, 3), ("ppo", "test", 2, 3)]
        assert con.execute("SELECT count(*) FROM generations").fetchone()[0] == 5 * 3 * (1 + 2)
        assert con.execute("SELECT kind, status FROM cells ORDER BY kind").fetchall() == [
            ("base", "evaluated"), ("rl", "evaluated")]
        # a second ingest runs while this reader holds the store open; the reader keeps the old data
        before = con.execute("SELECT value FROM meta WHERE key = 'built_at'").fetchone()[0]
        proc = run("--forcerun", "ingest", str(db))
        assert "ingest" in proc.stderr + proc.stdout
        assert con.execute("SELECT value FROM meta WHERE key = 'built_at'").fetchone()[0] == before
        assert con.execute("SELECT count(*) FROM evals").fetchone()[0] == 5
    finally:
        con.close()
    # the findings table beside the report, and Snakemake's own report holding it with the figures
    found = (res / "findings.tsv").read_text().splitlines()
    assert found[0].split("\t")[:3] == ["finding", "name", "verdict"] and len(found) == 8
    run("--report", str(tmp_path / "report.zip"))
    import zipfile

    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("findings.tsv") for n in names) and any(n.endswith(".png") for n in names)
    summary = (res / "summary.txt").read_text()
    assert "as_fm3_tg_omi1_omi2 · s · ppo · KL 0 · seed 0" in summary and "before RL (step     0)" in summary
    assert (res / "report.html").exists() and (res / "figures" / "figures.json").exists()
    assert list((res / "figures").glob("fig1_*.png"))
    assert (res / "logs/ingest.log").exists() and (res / "benchmarks/ingest.tsv").exists()
    out = subprocess.run([sys.executable, "-m", "echochamber.report", str(db)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == summary.strip()
