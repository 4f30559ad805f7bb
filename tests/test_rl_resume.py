"""Resumable RL: a job killed by a real SIGKILL mid-run, rerun with the same command, ends with the numbers
of an uninterrupted run, bit for bit on one CPU thread; a resume state saved for other inputs is ignored."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from echochamber import models as ec_models
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer
from echochamber.formats import document
from echochamber.rl import train

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock columns: they measure the machine, not the training.
TIMINGS = ["rollout_s", "score_s", "train_s", "step_s", "tokens_per_s"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A BPE tokenizer, a tiny random OLMo checkpoint and a prompt file whose gold answers are all 8: the
    random model's stray digits are sometimes right, so every algorithm gets rewards (and EI examples)."""
    from transformers import OlmoConfig, OlmoForCausalLM

    root = tmp_path_factory.mktemp("rl_resume")
    diff = synthetic.Difficulty()
    docs = [document(r["question"], r["solution"])
            for r in synthetic.generate("tg", "tinygsm", "train", 40, seed=0, difficulty=diff)]
    tok = ec_tokenizer.train_bpe(docs, 320)
    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, bos_token_id=None))
    base = ec_models.save_checkpoint(model, tok, root / "base")
    prompts = root / "gsm8k.parquet"
    rows = synthetic.generate("gsm8k", "gsm8k", "train", 16, seed=0, difficulty=diff)
    synthetic.write_parquet([{**r, "answer": "8"} for r in rows], prompts)
    return {"base": base, "prompts": prompts}


def spec(algo: str, **kw) -> dict:
    """Four rollout steps (EI: four rounds) of a tiny cell, checkpoints at steps 1, 2 and 4 (EI: every round)."""
    s = dict(algo=algo, kl_coef=0.0 if algo == "ei" else 0.01, seed=0, rollout_batch_size=4, samples_per_prompt=2,
             train_batch_size=4, micro_batch_size=4, max_new_tokens=12, temperature=1.0, max_steps=4,
             actor_lr=1e-3, critic_lr=1e-3, warmup_ratio=0.25, precision="fp32", n_checkpoints=3,
             samples_logged=3, ei=dict(rounds=4, samples_per_prompt=2, max_prompts=6, batch_size=4, epochs=1,
                                       lr=1e-3, from_base=False))
    s.update(kw)
    return s


def command(world, s: dict, out: Path) -> list[str]:
    """The rule's command line (rules/rl.smk): echochamber.launch, which execs `accelerate launch`."""
    return [sys.executable, "-m", "echochamber.launch", "--processes", "1", "--port", "29517", "--precision", "fp32",
            str(ROOT / "workflow_scripts" / "rl.py"), "--spec", json.dumps(s), "--base", str(world["base"]),
            "--prompts", str(world["prompts"]), "--out", str(out), "--threads", "1", "--save-every", "1"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # its own process group: the kill reaches accelerate's launcher and the training process, as Slurm's does
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def finish(cmd, log: Path) -> str:
    proc = start(cmd, log)
    assert proc.wait(600) == 0, log.read_text()[-4000:]
    return log.read_text()


def weights(out: Path) -> dict[str, dict]:
    return {p.name: load_file(p / "model.safetensors") for p in sorted((out / "checkpoints").glob("step=*"))}


@pytest.mark.parametrize("algo", ["ppo", "grpo", "ei"])
def test_a_killed_job_resumes_and_ends_with_the_numbers_of_an_uninterrupted_one(world, tmp_path, algo):
    s = spec(algo)
    finish(command(world, s, tmp_path / "reference"), tmp_path / "reference.log")

    out = tmp_path / "cell"
    cmd = command(world, s, out)
    first = start(cmd, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    # killed once step 2 is saved (in EI, round 1 of this tiny cell keeps no example: the model moves in round 2)
    while "saved the resume state at step 2" not in (tmp_path / "first.log").read_text():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no resume state was saved in time"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    assert not (out / "steps.parquet").exists()
    saved_at = torch.load(out / "resume" / "state.pt", weights_only=True)["step"]
    assert 2 <= saved_at < 4
    # Snakemake removes a failed job's declared outputs (checkpoints/ among them) before it reruns it.
    for kept in (out / "checkpoints").glob("step=*"):
        assert (kept / "model.safetensors").stat().st_nlink == 2        # a hard link in resume/, not a copy
    shutil.rmtree(out / "checkpoints")

    log = finish(cmd, tmp_path / "second.log")
    assert f"resuming from {out / 'resume'} at step {saved_at} of 4" in log
    assert f"step {saved_at}/4" not in log and f"step {saved_at + 1}/4" in log   # no step done twice
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "machine.json", "samples.parquet", "steps.parquet"]

    ref, got = (pd.read_parquet(d / "steps.parquet").drop(columns=TIMINGS) for d in (tmp_path / "reference", out))
    assert got.step.tolist() == [1, 2, 3, 4]
    assert ref.reward.sum() > 0 and (algo != "ei" or ref.kept.sum() > 0)       # the updates had signal
    pd.testing.assert_frame_equal(got, ref, check_exact=True)           # bit for bit
    pd.testing.assert_frame_equal(pd.read_parquet(out / "samples.parquet"),
                                  pd.read_parquet(tmp_path / "reference" / "samples.parquet"), check_exact=True)
    ref_w, got_w = weights(tmp_path / "reference"), weights(out)
    assert list(got_w) == list(ref_w) and {"step=1", "step=2", "step=4"} <= set(ref_w)
    for name in ref_w:
        assert all(torch.equal(got_w[name][k], ref_w[name][k]) for k in ref_w[name]), name


def _interrupted(world, s: dict, out: Path, monkeypatch) -> None:
    """A run that dies writing its last checkpoint, after the resume save of step 3."""
    save = ec_models.save_checkpoint

    def crash_at_the_end(model, tok, path):
        if Path(path).name == "step=4":
            raise KeyboardInterrupt
        return save(model, tok, path)

    with monkeypatch.context() as m:
        m.setattr(ec_models, "save_checkpoint", crash_at_the_end)
        with pytest.raises(KeyboardInterrupt):
            train.run(s, base=world["base"], prompts=world["prompts"], out=out, save_every=3)
    assert torch.load(out / "resume" / "state.pt", weights_only=True)["step"] == 3


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_resume_state_saved_with_other_settings_is_discarded(world, tmp_path, monkeypatch, caplog, one_thread):
    _interrupted(world, spec("grpo"), tmp_path / "cell", monkeypatch)
    other = spec("grpo", actor_lr=5e-4)
    with caplog.at_level(logging.INFO, logger="echochamber.rl"):
        train.run(other, base=world["base"], prompts=world["prompts"], out=tmp_path / "cell")
    assert "ignoring the resume state" in caplog.text and "resuming" not in caplog.text
    assert not (tmp_path / "cell" / "resume").exists()
    train.run(other, base=world["base"], prompts=world["prompts"], out=tmp_path / "fresh")
    got, fresh = (pd.read_parquet(tmp_path / d / "steps.parquet").drop(columns=TIMINGS) for d in ("cell", "fresh"))
    pd.testing.assert_frame_equal(got, fresh, check_exact=True)


def test_the_fingerprint_follows_settings_and_input_contents_not_threads(world, tmp_path):
    from echochamber.rl.settings import Settings

    s = Settings.from_spec(spec("ppo"))

    def fp_of(settings, world_size=1):
        return train.fingerprint(settings, world["base"], world["prompts"], world_size)

    fp = fp_of(s)
    assert fp_of(Settings.from_spec({**spec("ppo"), "threads": 7})) == fp
    assert fp_of(Settings.from_spec(spec("ppo", ppo={"epochs": 2}))) != fp
    assert fp_of(s, world_size=2) != fp
    other = tmp_path / "prompts.parquet"
    other.write_bytes(world["prompts"].read_bytes() + b"\0")
    assert train.fingerprint(s, world["base"], other, 1) != fp


def test_a_damaged_resume_state_stops_with_one_sentence_naming_it(world, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "cell"
    _interrupted(world, spec("ppo"), out, monkeypatch)
    state = out / "resume" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(train.RLInputError) as err:
        train.run(spec("ppo"), base=world["base"], prompts=world["prompts"], out=out)
    assert str(state) in str(err.value) and "\n" not in str(err.value)
