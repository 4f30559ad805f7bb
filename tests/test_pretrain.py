"""Pretraining: schedule, data order, a real tiny run, kill-and-resume, 2 processes == 1 process."""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from echochamber import launch, models
from echochamber import pretrain as P
from echochamber.config import ConfigError
from echochamber.data import mixture as M
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow_scripts" / "pretrain.py"
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64}


def settings(**kw) -> dict:
    return {**P.DEFAULTS, "seq_len": 64, "batch_size": 16, "micro_batch_size": 8, "max_steps": 120,
            "warmup_steps": 10, "lr": 1e-2, "scale": TINY, "scale_name": "tiny", "seed": 0,
            **kw}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three synthetic sources, a BPE tokenizer and their mixture, as the workflow would make them."""
    root = tmp_path_factory.mktemp("pretrain")
    files = {}
    for src, render in (("tg", "tinygsm"), ("omi1", "omi1"), ("omi2", "omi2")):
        files[src] = root / f"{src}.parquet"
        synthetic.write_parquet(synthetic.generate(src, render, "train", 300, seed=0,
                                                   difficulty=synthetic.Difficulty()), files[src])
    tok = ec_tokenizer.train_bpe(ec_tokenizer.documents(files.values()), 400)
    tok.save_pretrained(root / "tokenizer")
    tokens = {src: root / "tokens" / f"source={src}" for src in files}
    for src, path in files.items():
        M.tokenize_source(src, path, tok, tokens[src])
    manifest = M.build("tg_omi1_omi2", {"tg": 1, "omi1": 1, "omi2": 1}, tokens, root / "mixture", seed=0)
    return root, root / "mixture", root / "tokenizer", manifest


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted run of the tiny config, in this process, on one CPU thread."""
    root, mix, tok, _ = world
    summary = P.run(settings(), mix, tok, root / "reference", device="cpu", threads=1)
    return summary, pd.read_parquet(root / "reference" / "curve.parquet"), root / "reference"


def _launch(args: list[str], log: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, **popen)


def _script_args(s: dict, mix, tok, out, threads=1, save_every=1000) -> list[str]:
    return [str(SCRIPT), "--settings", json.dumps(s), "--mixture", str(mix), "--tokenizer", str(tok),
            "--out", str(out), "--device", "cpu", "--threads", str(threads), "--save-every", str(save_every)]


# ----------------------------------------------------------------------------- pieces

def test_data_order_is_a_seeded_permutation_per_epoch():
    o = P.Order(10, seed=3)
    first, second = o.indices(0, 10), o.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and not np.array_equal(first, second)
    assert np.array_equal(o.indices(5, 10), np.concatenate([first[5:], second[:5]]))   # across an epoch
    assert np.array_equal(P.Order(10, seed=3).indices(0, 10), first)
    assert not np.array_equal(P.Order(10, seed=4).indices(0, 10), first)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_micro_batches_of_all_processes_cover_the_global_batch_once(processes):
    seen = [i for r in range(processes) for sl in P.micro_slices(16, 2, processes, r) for i in range(16)[sl]]
    assert sorted(seen) == list(range(16))
    assert len(P.micro_slices(16, 2, processes, 0)) == 16 // (2 * processes)
    with pytest.raises(P.PretrainError, match="not a multiple"):
        P.micro_slices(16, 3, processes, 0)


def test_settings_carry_what_training_uses_and_check_config_catches_bad_batches():
    cfg = {"pretrain": {"batch_size": 32, "micro_batch_size": 8, "processes": 2, "threads": 4, "lr": 1e-3},
           "scales": {"s": TINY}, "grid": {"scales": ["s"]}}
    s = P.settings(cfg, "s", 3)
    assert s["lr"] == 1e-3 and s["seed"] == 3 and s["scale"] == TINY and s["warmup_steps"] == 30
    assert "processes" not in s and "threads" not in s
    P.check_config(cfg)
    cfg["pretrain"]["processes"] = 3
    with pytest.raises(ConfigError, match="pretrain.batch_size 32 is not a multiple"):
        P.check_config(cfg)
    cfg["pretrain"]["processes"] = 1
    cfg["scales"]["s"] = {**TINY, "context": 128}
    cfg["pretrain"]["seq_len"] = 256
    with pytest.raises(ConfigError, match="scales.s.context 128"):
        P.check_config(cfg)
    assert "--multi_gpu" not in launch.launch_args(1) and "--num_processes 2 " in launch.launch_args(2) + " "


def test_per_scale_settings_change_only_their_scale():
    """The paper's shape: 150M on 4 GPUs, 1B on 8 with half the micro-batch, the same global batch."""
    big = {**TINY, "d_model": 128}
    cfg = {"pretrain": {"batch_size": 512, "micro_batch_size": 16, "gpus": 4, "processes": 1,
                        "per_scale": {"b": {"gpus": 8, "micro_batch_size": 8}}},
           "scales": {"s": TINY, "b": big}, "grid": {"scales": ["s", "b"]}}
    assert (P.gpus(cfg, "s"), P.processes(cfg, "s")) == (4, 4)
    assert (P.gpus(cfg, "b"), P.processes(cfg, "b")) == (8, 8)
    assert (P.micro_batch_size(cfg, "s"), P.micro_batch_size(cfg, "b")) == (16, 8)
    small, large = P.settings(cfg, "s", 0), P.settings(cfg, "b", 0)
    assert {k for k in small if small[k] != large[k]} == {"scale", "scale_name"}
    assert not {"gpus", "per_scale", "processes", "micro_batch_size"} & set(large)  # job keys rerun nothing
    P.check_config(cfg)
    cfg["pretrain"]["per_scale"]["b"]["micro_batch_size"] = 48
    with pytest.raises(ConfigError, match=r"48 x 8 at scale b"):
        P.check_config(cfg)
    del cfg["pretrain"]["gpus"], cfg["pretrain"]["per_scale"]  # a CPU config: gloo processes, no GPUs
    assert (P.gpus(cfg, "s"), P.processes(cfg, "s")) == (0, 1)


def test_a_scale_can_have_its_own_lr_and_steps_and_only_its_cells_see_them():
    """A wider model usually wants a smaller lr: per_scale.<scale>.lr is that scale's identity (its cells rerun
    when it changes), and no other scale's."""
    big = {**TINY, "d_model": 128}
    cfg = {"pretrain": {"lr": 4e-3, "max_steps": 100, "per_scale": {"b": {"lr": 2e-3, "max_steps": 300}}},
           "scales": {"s": TINY, "b": big}, "grid": {"scales": ["s", "b"]}}
    small, large = P.settings(cfg, "s", 0), P.settings(cfg, "b", 0)
    assert (small["lr"], small["max_steps"]) == (4e-3, 100)
    assert (large["lr"], large["max_steps"]) == (2e-3, 300)
    cfg["pretrain"]["per_scale"]["b"]["lr"] = 1e-3
    assert P.settings(cfg, "s", 0) == small and P.settings(cfg, "b", 0)["lr"] == 1e-3


def test_a_job_launches_one_process_per_allocated_gpu_else_the_configured_count():
    from types import SimpleNamespace as NS

    assert launch.job_processes(NS(processes=2)) == 2
    assert launch.job_processes(NS(processes=4, gpu=0)) == 4
    assert launch.job_processes(NS(processes=4, gpu=8)) == 8


def test_the_resume_fingerprint_ignores_save_every_only(world):
    manifest = world[3]
    fp = P.fingerprint(settings(), manifest)
    assert P.fingerprint(settings(save_every=7), manifest) == fp
    assert P.fingerprint(settings(lr=2e-2), manifest) != fp
    assert P.fingerprint(settings(), {**manifest, "tokens": 1}) != fp


# ----------------------------------------------------------------------------- a real tiny run

def test_loss_falls_well_below_the_unigram_entropy(world, reference):
    summary, curve, cell = reference
    entropy = world[3]["unigram_entropy"]
    assert list(curve.columns) == list(P.CURVE_COLUMNS)
    assert curve["step"].tolist() == list(range(1, 121))
    assert (curve["tokens"] == curve["step"] * 16 * 64).all()
    assert curve["loss"].iloc[0] > 0.9 * entropy                       # starts near ln(vocab), not trained
    assert curve["loss"].tail(10).mean() < 0.5 * entropy               # well below the best unigram model
    assert curve["lr"].max() == pytest.approx(1e-2) and curve["lr"].iloc[-1] < 2e-3
    assert np.isfinite(curve["grad_norm"]).all() and (curve["tokens_per_s"] > 0).all()
    assert summary["final_loss"] == curve["loss"].iloc[-1]
    assert sorted(p.name for p in cell.iterdir()) == ["curve.parquet", "machine.json", "model"]   # no resume state


def test_checkpoint_loads_with_auto_classes_and_generates(world, reference):
    model_dir = reference[2] / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = M.TokenStream(world[1])
    ids = torch.from_numpy(stream.sequences(range(8), 64))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.5 * world[3]["unigram_entropy"]
    prompt = tok("Ava has 12 apples. She buys 5 more apples. How many apples does Ava have now?\n\n",
                 return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 5


def test_the_same_config_gives_the_same_numbers_and_the_seed_changes_them(world, tmp_path):
    _, mix, tok, _ = world
    runs = [pd.read_parquet(Path(tmp_path / name) / "curve.parquet")
            for name, seed in (("a", 0), ("b", 0), ("c", 1))
            if P.run(settings(max_steps=6, seed=seed), mix, tok, tmp_path / name, device="cpu", threads=1)]
    assert runs[0]["loss"].tolist() == runs[1]["loss"].tolist()
    assert runs[0]["loss"].tolist() != runs[2]["loss"].tolist()


@pytest.mark.parametrize("key, before, value", [("windows", "stream", "document_start"),
                                                 ("documents", "by_source", "shuffled")])
def test_data_order_settings_reach_the_trainer_and_their_old_defaults_keep_params(world, tmp_path, monkeypatch,
                                                                                  key, before, value):
    _, mix, tok, _ = world
    cfg = {"pretrain": {}, "scales": {"s": TINY}, "grid": {"scales": ["s"]}}
    assert key not in P.settings(cfg, "s", 0)  # cells trained before the setting existed keep their params
    cfg["pretrain"][key] = value
    assert P.settings(cfg, "s", 0)[key] == value
    seen = []   # (the stream's class, the window starts) of every batch read
    read = M.TokenStream.sequences
    monkeypatch.setattr(M.TokenStream, "sequences",
                        lambda self, idx, L, starts=None: seen.append((type(self), starts))
                        or read(self, idx, L, starts))
    curves = []
    for v in (before, value):
        P.run(settings(max_steps=4, **{key: v}), mix, tok, tmp_path / v, device="cpu", threads=1)
        curves.append(pd.read_parquet(tmp_path / v / "curve.parquet"))
    assert seen[0][0] is M.TokenStream and seen[0][1] is None
    stream = M.TokenStream(mix)
    if key == "windows":
        assert seen[-1][0] is M.TokenStream
        assert np.array_equal(seen[-1][1], stream.document_windows(64, stream.manifest["tokenizer"]["eos_id"]))
    else:
        assert seen[-1][0] is M.ShuffledDocuments and seen[-1][1] is None
    assert curves[0]["loss"].tolist() != curves[1]["loss"].tolist()


def test_a_killed_run_resumes_and_ends_with_the_same_loss(world, reference, tmp_path, caplog):
    """SIGKILL the real process after its first save; the restart must resume and match exactly."""
    _, mix, tok, _ = world
    cell = tmp_path / "cell"
    args = [sys.executable, *_script_args(settings(), mix, tok, cell, save_every=10)]
    first = _launch(args, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while not (cell / "resume" / "progress.json").exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no resume state was saved in time"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    assert not (cell / "curve.parquet").exists() and not (cell / "model").exists()
    saved_at = json.loads((cell / "resume" / "progress.json").read_text())["step"]
    assert 10 <= saved_at < 120

    # The restart (here in this process, as the workflow would rerun the same command) resumes.
    with caplog.at_level(logging.INFO, logger="echochamber.pretrain"):
        P.run(settings(), mix, tok, cell, device="cpu", threads=1, save_every=10)
    assert f"resuming from {cell / 'resume'} at step {saved_at}" in caplog.text
    resumed = pd.read_parquet(cell / "curve.parquet")
    ref = reference[1]
    assert resumed["step"].tolist() == ref["step"].tolist()
    # Same final loss as the uninterrupted run; on one CPU thread it is bit-identical (tolerance 1e-6).
    assert resumed["loss"].iloc[-1] == pytest.approx(ref["loss"].iloc[-1], rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(resumed["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(resumed["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=1e-6)
    assert not (cell / "resume").exists()


def test_two_processes_give_the_curve_of_one_with_accumulation(world, tmp_path):
    """The real `accelerate launch` with 2 gloo processes vs 1 process accumulating 2 micro-batches."""
    _, mix, tok, _ = world
    s = settings(max_steps=8, batch_size=8, micro_batch_size=4, warmup_steps=2)
    one = P.run(s, mix, tok, tmp_path / "one", device="cpu", threads=1)
    command = [sys.executable, "-m", "accelerate.commands.launch", *shlex.split(launch.launch_args(2))]
    proc = _launch([*command, *_script_args(s, mix, tok, tmp_path / "two", threads=2)], tmp_path / "two.log")
    assert proc.wait(300) == 0, (tmp_path / "two.log").read_text()[-3000:]
    assert "(1 micro-steps x 2 processes)" in (tmp_path / "two.log").read_text()
    a = pd.read_parquet(tmp_path / "one" / "curve.parquet")
    b = pd.read_parquet(tmp_path / "two" / "curve.parquet")
    assert one["processes"] == 1 and a["step"].tolist() == b["step"].tolist()
    # Float tolerance: gloo sums the two halves of the gradient in another order than accumulation.
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["lr"], a["lr"], rtol=1e-12)


# ----------------------------------------------------------------------------- user mistakes

def test_a_missing_mixture_stops_with_one_sentence_naming_the_path(world, tmp_path, capsys):
    _, _, tok, _ = world
    missing = tmp_path / "mixtures" / "mixture=nope"
    with pytest.raises(P.PretrainError) as err:
        P.run(settings(), missing, tok, tmp_path / "cell", device="cpu")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    code = P.main(["--settings", json.dumps(settings()), "--mixture", str(missing), "--tokenizer", str(tok),
                   "--out", str(tmp_path / "cell"), "--device", "cpu"])
    assert code == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain error:")]
    assert len(err_lines) == 1 and str(missing) in err_lines[0]
    assert not (tmp_path / "cell" / "model").exists()


def test_a_mixture_from_another_tokenizer_is_refused(world, tmp_path):
    root, mix, _, _ = world
    other = ec_tokenizer.train_bpe(["just a few words " * 20], 300)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(P.PretrainError, match="tokenizer"):
        P.run(settings(), mix, tmp_path / "other", tmp_path / "cell", device="cpu")


def _interrupted_run(s, mix, tok, cell, monkeypatch, save_every=3):
    """A run that dies after its last resume save (at the final checkpoint write), leaving resume/."""
    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(models, "save_checkpoint", crash)
        with pytest.raises(KeyboardInterrupt):
            P.run(s, mix, tok, cell, device="cpu", threads=1, save_every=save_every)
    assert (cell / "resume" / "progress.json").is_file()


def test_a_resume_state_from_other_settings_is_ignored(world, tmp_path, monkeypatch, caplog):
    _, mix, tok, _ = world
    s = settings(max_steps=6)
    _interrupted_run(s, mix, tok, tmp_path / "cell", monkeypatch)
    other = settings(max_steps=6, lr=5e-3)
    with caplog.at_level(logging.INFO, logger="echochamber.pretrain"):
        P.run(other, mix, tok, tmp_path / "cell", device="cpu", threads=1)
    assert "ignoring" in caplog.text and "resuming" not in caplog.text
    P.run(other, mix, tok, tmp_path / "fresh", device="cpu", threads=1)
    assert pd.read_parquet(tmp_path / "cell" / "curve.parquet")["loss"].tolist() == \
        pd.read_parquet(tmp_path / "fresh" / "curve.parquet")["loss"].tolist()


def test_a_damaged_resume_state_stops_with_one_sentence_naming_it(world, tmp_path, monkeypatch):
    _, mix, tok, _ = world
    s = settings(max_steps=6)
    cell = tmp_path / "cell"
    _interrupted_run(s, mix, tok, cell, monkeypatch)
    state = next(f for f in (cell / "resume").iterdir() if f.name.startswith("optimizer"))
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(P.PretrainError) as err:
        P.run(s, mix, tok, cell, device="cpu", threads=1)
    assert str(cell / "resume") in str(err.value) and "\n" not in str(err.value)


def test_rl_jobs_launch_on_the_gpus_of_their_node_else_on_cpus():
    gpu = launch.rl_command("rl.py", ["--spec", "{}"], processes=4, port=29612, precision="bf16", cuda=True)
    cpu = launch.rl_command("rl.py", ["--spec", "{}"], processes=1, port=29612, precision="fp32", cuda=False)
    assert "--cpu" not in gpu and gpu[gpu.index("--num_processes") + 1] == "4"
    assert gpu[gpu.index("--mixed_precision") + 1] == "bf16" and gpu[-3:] == ["rl.py", "--spec", "{}"]
    assert "--cpu" in cpu and cpu[cpu.index("--mixed_precision") + 1] == "no"
    # each cell its own rendezvous port, the same on every run
    ports = {launch.port_for(f"mixture=m/scale=s/algo=ppo/kl={kl}/seed=0") for kl in ("0", "0.001", "0.01")}
    assert len(ports) == 3 and all(29500 <= p < 31500 for p in ports)
    assert launch.port_for("a") == launch.port_for("a")
