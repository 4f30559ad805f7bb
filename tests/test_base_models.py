"""Released checkpoints as base models (config base_models): validation, the grid helpers, and the
`base_model` rule through the real workflow on a tiny random-init OLMo saved locally by the test."""

import copy
import re

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, snakemake, tiny_config, write_config
from echochamber import base_models, grid, manifest, models, pretrain
from echochamber import config as ec_config
from echochamber.data import tokenizer

MIX = tiny_config("results")["grid"]["mixtures"][0]   # the embedded study's mixture


def two_by_two(results="results"):
    """Two mixtures x two scales, PPO at one KL."""
    cfg = tiny_config(results)
    cfg["mixtures"]["as_fm3_tg"] = {"as": 1, "fm3": 1, "tg": 1}
    cfg["grid"]["mixtures"] = [MIX, "as_fm3_tg"]
    cfg["grid"]["scales"] = ["xs", "s"]
    return cfg


def test_unknown_names_fail_in_one_sentence():
    cfg = two_by_two()
    cfg["base_models"] = {"nope": {"s": "org/model"}}
    with pytest.raises(ec_config.ConfigError, match=r"^cfg: base_models: unknown mixture 'nope'; "
                                                    rf"defined in mixtures: .*{MIX}.*, as_fm3_tg$"):
        ec_config.validate(cfg, origin="cfg")
    cfg["base_models"] = {MIX: {"huge": "org/model"}}
    with pytest.raises(ec_config.ConfigError, match=rf"^cfg: base_models\.{MIX}: unknown scale 'huge'; "
                                                    r"defined in scales: (\w+, )*s(, \w+)*$"):
        ec_config.validate(cfg, origin="cfg")
    cfg["base_models"] = {MIX: {"s": ""}}
    with pytest.raises(ec_config.ConfigError, match=rf"base_models\.{MIX}\.s"):
        ec_config.validate(cfg, origin="cfg")
    cfg["base_models"] = {MIX: {"s": "org/model"}}
    ec_config.validate(cfg, origin="cfg")


def test_bad_name_stops_the_workflow_before_any_job(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    cfg["base_models"] = {"as_fm3_2xtg": {"s": "org/model"}}
    proc = snakemake("-n", f"--configfile={write_config(tmp_path / 'c.yaml', cfg)}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "base_models: unknown mixture 'as_fm3_2xtg'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cells_and_what_they_no_longer_need():
    cfg = two_by_two()
    assert base_models.cells(cfg) == {} and base_models.needs_tokenizer(cfg)
    assert base_models.sources_needed(cfg) == grid.sources_needed(cfg)
    assert not re.fullmatch(base_models.cell_pattern(cfg), f"mixture={MIX}/scale=s/seed=0")

    cfg["base_models"] = {"as_fm3_tg": {"xs": "org/a", "s": "/ckpt/b"}, MIX: {"s": "org/c"}}
    want = {"mixture=as_fm3_tg/scale=xs/seed=0": "org/a", "mixture=as_fm3_tg/scale=s/seed=0": "/ckpt/b",
            f"mixture={MIX}/scale=s/seed=0": "org/c"}
    assert base_models.cells(cfg) == want
    pattern = base_models.cell_pattern(cfg)
    assert all(re.fullmatch(pattern, c) for c in want)
    assert not re.fullmatch(pattern, f"mixture={MIX}/scale=xs/seed=0")      # pretrained as usual
    assert [c.id for c in base_models.trained_cells(cfg)] == [f"mixture={MIX}/scale=xs/seed=0"]
    assert base_models.sources_needed(cfg) == grid.sources_needed(cfg)     # MIX still needs all its data

    cfg["base_models"][MIX]["xs"] = "org/d"                                 # nothing is pretrained now
    assert not base_models.needs_tokenizer(cfg)
    assert base_models.sources_needed(cfg) == ["gsm8k"]                     # RL prompts and benchmarks only


def test_load_failures_name_the_model_and_the_local_folder_way(tmp_path):
    out = (tmp_path / "model", tmp_path / "curve.parquet")
    with pytest.raises(base_models.BaseModelError, match=r"^base model folder './no-such-dir' does not exist; "):
        base_models.materialise("./no-such-dir", *out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(base_models.BaseModelError, match=r"could not be loaded .*local folder holding a transformers"):
        base_models.materialise(str(tmp_path / "empty"), *out)
    assert not out[0].exists() and not out[1].exists()


def tiny_released_model(path):
    """A random-init OLMo of a few thousand parameters with its tokenizer, as a released checkpoint."""
    texts = ["Ava has 12 apples.\n\nShe gives 3 away. \\boxed{9}", "def simple_math_problem() -> int:"] * 20
    tok = tokenizer.train_bpe(texts, 300)
    scale = {"d_model": 16, "n_layers": 1, "n_heads": 2, "mlp_hidden": 32}
    model = models.build(scale, tok, max_len=64, seed=3)
    models.save_checkpoint(model, tok, path)
    return model


def test_base_model_rule_materialises_the_cell_instead_of_pretraining(tmp_path, monkeypatch):
    if "rules/base_models.smk" not in (ROOT / "Snakefile").read_text():
        pytest.fail('the Snakefile must include "rules/base_models.smk" (after rules/pretrain.smk)')
    released = tiny_released_model(tmp_path / "released")
    cfg = tiny_config(tmp_path / "results")
    cfg["grid"]["scales"] = ["s"]
    cfg["base_models"] = {MIX: {"s": str(tmp_path / "released")}}
    path = write_config(tmp_path / "config.yaml", cfg)
    cell = tmp_path / "results" / "pretrain" / f"mixture={MIX}" / "scale=s" / "seed=0"

    # the whole grid: no data for the mixture, no tokenizer, no mixture, no pretraining; RL from the cell
    plan = snakemake("-n", "--quiet", "rules", f"--configfile={path}", cwd=tmp_path).stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:")[1], re.MULTILINE))
    assert {k: jobs.get(k) for k in ("base_model", "pretrain", "mixture", "tokens", "tokenizer", "source", "rl")} == {
        "base_model": "1", "pretrain": None, "mixture": None, "tokens": None, "tokenizer": None, "source": "1",
        "rl": "1"}

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = snakemake("--cores", "1", f"--configfile={path}", str(cell / "model" / "manifest.json"),
                    str(cell / "curve.parquet"), cwd=tmp_path)
    assert re.search(r"^(local)?rule base_model:", run.stdout + run.stderr, re.MULTILINE)
    manifest.verify(cell / "model")            # the materialised folder ends with its manifest
    got, tok = models.load_checkpoint(cell / "model")
    want = released.state_dict()
    assert got.state_dict().keys() == want.keys()
    assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)
    assert tok.eos_token == tokenizer.EOS and tok.pad_token == tokenizer.PAD
    curve = pq.read_table(cell / "curve.parquet")
    pretrain._write_curve([], tmp_path / "pretrain_curve.parquet")
    assert curve.num_rows == 0 and curve.schema.equals(pq.read_schema(tmp_path / "pretrain_curve.parquet"))
    assert tuple(curve.column_names) == pretrain.CURVE_COLUMNS
    assert (tmp_path / "results" / "logs" / "base_models" / f"mixture={MIX}" / "scale=s" / "seed=0.log").exists()

    # a hub id that cannot be fetched: the job fails in one sentence that says how to use a local folder
    bad = copy.deepcopy(cfg)
    bad["base_models"] = {MIX: {"s": "nobody/no-such-model"}}
    path = write_config(tmp_path / "bad.yaml", bad)
    failed = snakemake("--cores", "1", "--forcerun", "base_model", f"--configfile={path}", str(cell / "curve.parquet"),
                       cwd=tmp_path, check=False)
    assert failed.returncode != 0
    assert ("Base model error: base model 'nobody/no-such-model' (a hub id or local folder) could not be loaded"
            in failed.stdout + failed.stderr)
