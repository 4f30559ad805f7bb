"""The RL job of one grid cell: load the base model and prompts, run PPO / GRPO / EI, log and checkpoint.

Writes under ``out`` (``results/rl/<RLCell.id>/``):
- ``steps.parquet``: one row per rollout step (per round for EI), written when the run completes;
  while it runs, ``steps.partial.parquet`` holds the rows so far (replaced atomically each step);
- ``samples.parquet``: ``samples_logged`` completions per step;
- ``machine.json``: where the cell was trained (echochamber.machine);
- ``checkpoints/step=T/``: HF folders at ``n_checkpoints`` log-spaced steps, each episode's end and the
  last step (every round for EI). Step 0 is the base model and is not saved. ``checkpoints/manifest.json``
  (echochamber.manifest), written last, lists the planned steps and their files: consumers use it;
- ``resume/`` while it runs: every ``save_every`` steps (every round for EI) ``state.pt`` holds all a
  continuation needs (weights, optimizers, schedules, every process's RNG states, the rows so far), and
  ``checkpoints/`` hard links to the checkpoints written so far (Snakemake removes ``checkpoints/`` before
  it reruns a job). A rerun with the same settings, base model and prompts resumes there and ends with
  the same numbers as an uninterrupted run; the folder is removed when the run completes.

Run it under ``accelerate launch`` (``python -m echochamber.rl.train --help``); rank 0 writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echochamber import machine as ec_machine
from echochamber import manifest as ec_manifest
from echochamber import models as ec_models
from echochamber.config import ConfigError
from echochamber.data.tokenizer import encode_prompt
from echochamber.io import atomic_path, unreadable
from echochamber.rl import tables
from echochamber.rl.settings import DEFAULTS, Settings
from echochamber.rl.trainer import Accel, checkpoint_steps

log = logging.getLogger("echochamber.rl")
RESUME, STATE = "resume", "state.pt"


class RLInputError(ValueError):
    """A missing or malformed input of the RL job (prompts file, batch sizes); one sentence."""


# ---------------------------------------------------------------------------------------------- inputs


def load_prompts(path, max_prompts: int | None = None) -> tuple[list[str], list[str]]:
    """Questions and gold answers of the prompt parquet (columns ``question`` and ``answer``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise RLInputError(f"prompt file {path} does not exist (set by rl.prompts.source and rl.prompts.split)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing input error
        raise RLInputError(unreadable("prompt file", path, e)) from None
    missing = [c for c in ("question", "answer") if c not in table.column_names]
    if missing:
        raise RLInputError(f"prompt file {path} has no column {', '.join(map(repr, missing))} "
                           f"(it has {', '.join(table.column_names)})")
    questions, golds = table["question"].to_pylist(), table["answer"].to_pylist()
    if max_prompts:
        questions, golds = questions[:max_prompts], golds[:max_prompts]
    if not questions:
        raise RLInputError(f"prompt file {path} has no rows")
    return questions, [str(g) for g in golds]


def plan(s: Settings, n_prompts: int) -> dict:
    """Steps per episode, total steps and checkpoint steps of a run over ``n_prompts`` prompts."""
    if s.algo == "ei":
        return {"per_episode": 1, "total": s.ei.rounds, "checkpoints": list(range(1, s.ei.rounds + 1))}
    per_episode = n_prompts // s.rollout_batch_size
    if per_episode == 0:
        raise RLInputError(f"rl.rollout_batch_size: {s.rollout_batch_size} prompts per step but the prompt "
                           f"file has only {n_prompts}")
    total = s.max_steps or max(1, math.ceil(s.episodes * per_episode))
    return {"per_episode": per_episode, "total": total,
            "checkpoints": checkpoint_steps(total, per_episode, s.n_checkpoints)}


def step_prompts(n_prompts: int, batch: int, step: int, per_episode: int, seed: int) -> tuple[np.ndarray, int]:
    """Prompt indices of rollout step ``step`` (1-based): a fresh seeded shuffle each episode."""
    episode, within = divmod(step - 1, per_episode)
    order = np.random.default_rng([seed, episode]).permutation(n_prompts)
    return order[within * batch:(within + 1) * batch], episode


# ---------------------------------------------------------------------------------------------- run


def make_accelerator(s: Settings):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if s.precision == "bf16" else "no")


def run(spec: dict | Settings, *, base, prompts, out, scorer=None, accelerator=None, engine=None,
        save_every: int | None = None) -> dict:
    """Train one cell (or continue it from ``out/resume/``); returns a summary (rows, checkpoint steps, wall time).

    ``save_every``: rollout steps between resume states (``rl.save_every``; EI saves after every round).
    """
    t_start = time.perf_counter()
    s = spec if isinstance(spec, Settings) else Settings.from_spec(spec)
    out = Path(out)
    accel = Accel(accelerator)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    load_checkpoint, save_checkpoint = ec_models.load_checkpoint, ec_models.save_checkpoint

    questions, golds = load_prompts(prompts, s.prompts.get("max_prompts"))
    if s.algo == "ei" and s.ei.max_prompts:
        questions, golds = questions[:s.ei.max_prompts], golds[:s.ei.max_prompts]
    # the base model against its manifest: sizes on every process, checksums once (on the main one)
    ec_manifest.verify(base, checksums=accel.main)
    policy, tok = load_checkpoint(base)
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise RLInputError(f"tokenizer of {base} needs an EOS and a pad token")
    policy.to(accel.device)
    prompt_ids = [encode_prompt(tok, q) for q in questions]  # as inside a pretraining document
    p = plan(s, len(questions))
    log.info("rl %s kl=%g seed=%d: %d prompts, %d steps (%d per episode), checkpoints at %s",
             s.algo, s.kl_coef, s.seed, len(questions), p["total"], p["per_episode"], p["checkpoints"])

    if s.algo == "ei":
        from echochamber.rl.ei import ExpertIteration
        trainer = ExpertIteration(s, policy, tok, scorer=scorer, accel=accel, engine=engine)
    else:
        ref = None
        if s.kl_coef > 0:
            ref, _ = load_checkpoint(base)
            ref.to(accel.device).eval().requires_grad_(False)
        batches_per_step = s.rollout_batch_size * s.samples_per_prompt // s.train_batch_size
        epochs = getattr(s, s.algo).epochs
        updates = p["total"] * batches_per_step * epochs
        if s.algo == "ppo":
            from echochamber.rl.ppo import Critic, PPOTrainer
            critic = Critic(policy).to(accel.device)
            trainer = PPOTrainer(s, policy, tok, ref=ref, critic=critic, scorer=scorer, accel=accel,
                                 total_updates=updates, engine=engine)
        else:
            from echochamber.rl.grpo import GRPOTrainer
            trainer = GRPOTrainer(s, policy, tok, ref=ref, scorer=scorer, accel=accel, total_updates=updates,
                                  engine=engine)

    fp = fingerprint(s, base, prompts, accel.world)
    start, rows, samples = 0, [], []
    state = _load_resume(out, fp, accel)
    accel.wait()                    # every process has read the state before it is removed or replaced
    if state is None:
        if accel.main:              # a fresh start: no step of an earlier plan stays behind
            shutil.rmtree(out / RESUME, ignore_errors=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    else:
        start, rows, samples = state["step"], state["rows"], state["samples"]
        trainer.load_state_dict(state["trainer"])
        _set_rng(state["rng"][accel.rank], trainer)
        if accel.main:
            _restore_checkpoints(out, start)
            log.info("resuming from %s at step %d of %d", out / RESUME, start, p["total"])
    every = 1 if s.algo == "ei" else int(save_every or DEFAULTS["save_every"])

    per_rank = (len(questions) if s.algo == "ei" else s.rollout_batch_size) // accel.world
    for step in range(start + 1, p["total"] + 1):
        t0 = time.perf_counter()
        if s.algo == "ei":
            idx, episode = np.arange(len(questions)), step - 1
        else:
            idx, episode = step_prompts(len(questions), s.rollout_batch_size, step, p["per_episode"], s.seed)
        mine = idx[accel.rank * per_rank:(accel.rank + 1) * per_rank] if s.algo != "ei" else \
            np.array_split(idx, accel.world)[accel.rank]
        my_prompts, my_golds = [prompt_ids[i] for i in mine], [golds[i] for i in mine]
        if s.algo == "ei":
            row, records = trainer.round(step, my_prompts, my_golds, int(mine[0]) if len(mine) else 0)
        else:
            row, records = trainer.step(my_prompts, my_golds)
            records = [r for part in accel.gather([records]) for r in part]
        row = {"step": step, "episode": episode, **row, "step_s": time.perf_counter() - t0}
        if accel.main:
            rows.append(row)
            samples += _pick_samples(records, step, s.samples_logged, s.seed)
            tables.write_table(rows, tables.STEP_COLUMNS, out / "steps.partial.parquet")
            log.info(_progress(row, p["total"]))
        if step in p["checkpoints"]:
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if accel.main:
                save_checkpoint(accel.unwrap(trainer.policy), tok, out / "checkpoints" / f"step={step}")
                _link_tree(out / "checkpoints" / f"step={step}", out / RESUME / "checkpoints" / f"step={step}")
        if step % every == 0 and step < p["total"]:
            _save_resume(out, step, fp, trainer, rows, samples, accel)

    if accel.main:
        ec_machine.write(out)       # where this cell was trained
        tables.write_table(samples, tables.SAMPLE_COLUMNS, out / "samples.parquet")
        tables.write_table(rows, tables.STEP_COLUMNS, out / "steps.parquet")
        (out / "steps.partial.parquet").unlink(missing_ok=True)
        ec_manifest.write_set(out / "checkpoints", p["checkpoints"])     # last: the set is complete
        shutil.rmtree(out / RESUME, ignore_errors=True)
    wall = time.perf_counter() - t_start
    log.info("rl done in %.1fs: reward %.3f -> %.3f", wall, rows[0]["reward"] if rows else float("nan"),
             rows[-1]["reward"] if rows else float("nan"))
    return {"rows": rows, "checkpoints": p["checkpoints"], "wall_s": wall, "trainer": trainer}


# ---------------------------------------------------------------------------------------------- resume state


def fingerprint(s: Settings, base, prompts, world: int) -> str:
    """What a resume state must match: the settings that change numbers (all but ``threads``), the process
    count, and the contents of the base checkpoint (its manifest lists every file's sha256, so the weights
    are not read again) and of the prompt file (not their paths)."""
    key = s.model_dump(exclude={"threads"})
    h = hashlib.sha256(json.dumps({**key, "world": world}, sort_keys=True).encode())
    h.update(json.dumps(json.loads((Path(base) / ec_manifest.NAME).read_text())["files"], sort_keys=True).encode())
    h.update(ec_manifest.sha256(prompts).encode())
    return h.hexdigest()[:20]


def _load_resume(out: Path, fp: str, accel) -> dict | None:
    """The resume state of this cell, or None when there is none or it was saved for other inputs."""
    path = out / RESUME / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged resume state is reported, not traced
        raise RLInputError(f"the resume state {path} is unreadable ({type(e).__name__}); delete "
                           f"{out / RESUME} to train this cell from the start") from None
    if state.get("fingerprint") != fp:
        if accel.main:
            log.warning("ignoring the resume state %s: it was saved with other settings, another base model "
                        "or other prompts; starting from step 0", path)
        return None
    return state


def _save_resume(out: Path, step: int, fp: str, trainer, rows: list, samples: list, accel) -> None:
    """One file, replaced atomically by the main process: a kill at any moment leaves the previous state."""
    rng = accel.gather([_rng_state(trainer)])        # every process's generators, in rank order
    if accel.main:
        state = {"fingerprint": fp, "step": step, "trainer": trainer.state_dict(), "rng": rng,
                 "rows": rows, "samples": samples}
        with atomic_path(out / RESUME / STATE) as tmp:
            torch.save(state, tmp)
        log.info("saved the resume state at step %d", step)


def _rng_state(trainer) -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()   # plain types: torch.load(weights_only)
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate(),
             **trainer.rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict, trainer) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {**np_state["state"],
                                               "key": np.array(np_state["state"]["key"], dtype=np.uint32)}})
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    trainer.set_rng_state(state)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of folder ``src`` made of hard links (plain copies where links fail)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=link)


def _restore_checkpoints(out: Path, step: int) -> None:
    """Put back the checkpoints up to ``step`` that the resume state kept (Snakemake removed them)."""
    for kept in sorted((out / RESUME / "checkpoints").glob("step=*")):
        if int(kept.name.split("=")[1]) <= step:
            _link_tree(kept, out / "checkpoints" / kept.name)


def _pick_samples(records: list[dict], step: int, n: int, seed: int) -> list[dict]:
    if n <= 0 or not records:
        return []
    rng = np.random.default_rng([seed, step, 17])
    chosen = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False))
    cols = [c for c in tables.SAMPLE_COLUMNS if c != "step"]
    return [{"step": step, **{c: records[i].get(c) for c in cols}} for i in chosen]


def _progress(row: dict, total: int) -> str:
    def f(key, fmt="{:.3f}"):
        v = row.get(key)
        return "-" if v is None else fmt.format(v)
    return (f"step {row['step']}/{total} ep {row['episode']} reward {f('reward')} "
            f"share tg/omi1/text {f('share_tinygsm', '{:.2f}')}/{f('share_omi1', '{:.2f}')}/"
            f"{f('share_text', '{:.2f}')} "
            f"acc tg/omi1/text {f('acc_tinygsm', '{:.2f}')}/{f('acc_omi1', '{:.2f}')}/{f('acc_text', '{:.2f}')} "
            f"kl {f('kl_div', '{:.4f}')} ent {f('entropy')} clip {f('clip_frac')} vloss {f('value_loss')} "
            f"len {f('response_len', '{:.0f}')} trunc {f('trunc_rate', '{:.2f}')} "
            f"{f('tokens_per_s', '{:.0f}')} tok/s {f('step_s', '{:.1f}')}s")


# ---------------------------------------------------------------------------------------------- CLI


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ConfigError, RLInputError, ec_models.CheckpointError, ec_manifest.ManifestError)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="RL-fine-tune one grid cell (run under accelerate launch)")
    ap.add_argument("--spec", required=True, help="the cell's rl settings as JSON, or @file.json")
    ap.add_argument("--base", required=True, help="base checkpoint folder")
    ap.add_argument("--prompts", required=True, help="prompt parquet (question, answer)")
    ap.add_argument("--out", required=True, help="output folder of the cell")
    ap.add_argument("--log", default=None, help="job log file")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for this job (all processes)")
    ap.add_argument("--save-every", type=int, default=None,
                    help=f"rollout steps between resume states (default {DEFAULTS['save_every']}; EI: every round)")
    ap.add_argument("--samples-logged", type=int, default=None, help="completions per step kept in samples.parquet "
                    "(rl.samples_logged: runtime, not in --spec)")
    a = ap.parse_args(argv)
    import transformers

    from echochamber.io import setup_logging

    transformers.utils.logging.disable_progress_bar()
    spec = json.loads(Path(a.spec[1:]).read_text() if a.spec.startswith("@") else a.spec)
    if a.samples_logged is not None:
        spec["samples_logged"] = a.samples_logged
    s = Settings.from_spec(spec)
    accelerator = make_accelerator(s)
    setup_logging(a.log if accelerator.is_main_process else None,
                  level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(max(1, threads // accelerator.num_processes))
    try:
        run(s, base=a.base, prompts=a.prompts, out=a.out, accelerator=accelerator, save_every=a.save_every)
    except _user_errors() as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
