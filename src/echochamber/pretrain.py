"""Pretraining from scratch on a packed mixture, with ``accelerate`` (one process or several).

One cell (mixture x scale x seed) is one call of :func:`run`, launched by ``accelerate launch``:

- data: the mixture's token stream (``documents: shuffled``: its documents in a seeded random order) cut
  into ``seq_len`` sequences (``windows: document_start``: each moved forward to the first document
  beginning inside it); each epoch visits them in a seeded permutation,
  and the position in the data is simply the step (so a restart needs nothing else);
- a step consumes ``batch_size`` sequences: each process takes ``micro_batch_size`` of them per
  micro-step, for ``batch_size / (micro_batch_size * processes)`` accumulated micro-steps, so any
  process count sees the same global batch and gives the same loss curve within float tolerance;
- AdamW (fused on CUDA; decay on matrices except the input embedding), linear warm-up then cosine to
  ``min_lr_ratio`` x lr (with ``decay_steps``: the peak held, the cosine over the last steps), gradient
  clipping, bf16 autocast and ``torch.compile`` when asked;
- every ``save_every`` steps the full state (model, optimizer, scheduler, RNG, curve so far) goes
  to ``<cell>/resume/``; a restarted run with the same settings resumes there and loses at most that
  interval; outputs are ``<cell>/model/`` (HF checkpoint + tokenizer + ``manifest.json``, written last),
  ``<cell>/curve.parquet`` and ``<cell>/machine.json`` (echochamber.machine: where it was trained).

torch, transformers and accelerate are imported inside functions, so the workflow can import the
config helpers here (:func:`settings`, :func:`check_config`) cheaply; launch arguments are in
``echochamber.launch``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from echochamber import machine as ec_machine
from echochamber import settings as ec_settings
from echochamber.io import atomic_path
from echochamber.schedule import lr_factor

# The section's identity defaults and its runtime keys: how a job runs, not what it computes (rule resources
# and flags, which never rerun a job); both from echochamber.settings.Pretrain.
DEFAULTS = ec_settings.identity(ec_settings.Pretrain())
SAVE_EVERY = ec_settings.Pretrain().save_every
JOB_KEYS = tuple(ec_settings.runtime_keys(ec_settings.Pretrain))
CURVE_COLUMNS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s")
RESUME, PROGRESS = "resume", "progress.json"

log = logging.getLogger("echochamber.pretrain")


class PretrainError(RuntimeError):
    """A user mistake or a bad input that stops a run; the message is one sentence."""


# ----------------------------------------------------------------------------- config helpers

def section(config: dict, scale: str | None = None) -> ec_settings.Pretrain:
    """The pretrain section (defaults filled) as one scale sees it: ``pretrain.per_scale.<scale>`` over the rest."""
    return ec_settings.Pretrain.model_validate(config.get("pretrain", {})).at(scale)


def settings(config: dict, scale: str, seed: int) -> dict:
    """Everything one cell's training depends on: the pretrain section's identity settings, the scale and
    the seed. The runtime keys (JOB_KEYS: processes, GPUs, threads, micro-batch size, save cadence) are
    left out: they only change how the same global batch is computed, so editing them reruns nothing."""
    p = ec_settings.identity(section(config, scale))
    # the behaviour from before these settings existed: those cells keep their params
    for key, before in (("windows", "stream"), ("documents", "by_source"), ("decay_steps", None)):
        if p[key] == before:
            del p[key]
    return {**p, "scale": dict(config["scales"][scale]), "scale_name": scale, "seed": int(seed)}


def save_every(config: dict, scale: str) -> int:
    """Steps between resume states (a runtime setting: how much a killed job loses, not what it computes)."""
    return section(config, scale).save_every


def micro_batch_size(config: dict, scale: str) -> int:
    """Sequences per process per micro-step (a runtime setting: the global batch and its loss are the same)."""
    return section(config, scale).micro_batch_size


def gpus(config: dict, scale: str) -> int:
    """GPUs of one pretraining job of this scale (the rule's ``gpu`` resource); 0 runs on CPUs."""
    return section(config, scale).gpus


def processes(config: dict, scale: str) -> int:
    """Processes of one pretraining job of this scale: one per GPU, else ``processes`` on CPUs."""
    return gpus(config, scale) or section(config, scale).processes


def threads(config: dict) -> int:
    return section(config).threads


def check_config(config: dict, origin: str = "config") -> None:
    """Cross-field checks the schema cannot express; raise ``ConfigError`` with one sentence."""
    from echochamber.config import ConfigError

    for name in sorted(set(config["grid"]["scales"])):
        p = section(config, name)
        n = processes(config, name)
        if p["batch_size"] % (p["micro_batch_size"] * n):
            raise ConfigError(f"{origin}: pretrain.batch_size {p['batch_size']} is not a multiple of "
                              f"micro_batch_size x processes = {p['micro_batch_size']} x {n} at scale {name}")
        context = config["scales"][name].get("context")
        if context and context < p["seq_len"]:
            raise ConfigError(f"{origin}: scales.{name}.context {context} is shorter than "
                              f"pretrain.seq_len {p['seq_len']}")


# ----------------------------------------------------------------------------- schedule and data order

class Order:
    """The seeded visiting order of ``n`` sequences: position k is epoch k // n, a fresh permutation each."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._permutation(int(epoch))[pos[sel] % self.n]
        return out


def micro_slices(batch_size: int, micro_batch_size: int, n_processes: int, rank: int) -> list[slice]:
    """This process's micro-batches within one global batch, one per accumulation step."""
    per_step = micro_batch_size * n_processes
    if batch_size % per_step:
        raise PretrainError(f"pretrain.batch_size {batch_size} is not a multiple of micro_batch_size x "
                            f"processes = {micro_batch_size} x {n_processes}")
    return [slice((a * n_processes + rank) * micro_batch_size, (a * n_processes + rank + 1) * micro_batch_size)
            for a in range(batch_size // per_step)]


def total_steps(s: dict, n_sequences: int) -> int:
    if s.get("max_steps"):
        return int(s["max_steps"])
    return max(1, int(s["epochs"] * n_sequences) // s["batch_size"])


# ----------------------------------------------------------------------------- the training step

def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices, none on the input embedding (nor vectors, which OLMo-1 shapes lack)."""
    emb = model.get_input_embeddings().weight
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and p is not emb else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """One optimizer step over a global batch, given this process's micro-batches.

    ``step`` returns ``(loss, grad_norm, lr)`` with loss and grad_norm as 0-d tensors, so the caller
    decides when to synchronise with the device (``.item()``).
    """

    def __init__(self, model, accelerator, *, lr: float, weight_decay: float, betas, eps: float,
                 warmup_steps: int, min_lr_ratio: float, grad_clip: float, total_steps: int,
                 decay_steps: int | None = None, precision: str = "fp32", compile: bool = False):
        import torch

        from echochamber import models

        self.accelerator = accelerator
        self.grad_clip = grad_clip
        on_cuda = accelerator.device.type == "cuda"
        if on_cuda:
            torch.set_float32_matmul_precision("high")      # TF32 for what stays in fp32
        model.config.use_cache = False
        models.use_packed_causal_attention(model)          # packed sequences: no mask, flash SDPA
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                                      **({"fused": True} if on_cuda else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            lr_factor, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio, decay=decay_steps))
        # The scheduler is stepped by hand (accelerate's wrapper would step it once per process).
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.forward = torch.compile(self.model) if compile else self.model
        self.autocast = functools.partial(torch.autocast, device_type=accelerator.device.type,
                                          dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(self, micro_batches):
        n = len(micro_batches)
        lr = self.scheduler.get_last_lr()[0]
        total = 0.0
        for i, ids in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(self.model)
            with sync:
                with self.autocast():
                    loss = self.forward(input_ids=ids, labels=ids, use_cache=False).loss
                self.accelerator.backward(loss / n)
            total = total + loss.detach()
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(total / n, "mean"), grad_norm, lr


# ----------------------------------------------------------------------------- resume state

def fingerprint(s: dict, manifest: dict) -> str:
    """What a resume state must match: the settings that change numbers and the mixture's identity."""
    key = {k: v for k, v in s.items() if k not in JOB_KEYS}
    key["mixture"] = {k: manifest[k] for k in ("tokens", "tokenizer", "segments", "weights", "seed")}
    key["mixture"]["tokenizer"] = {k: v for k, v in manifest["tokenizer"].items() if k not in ("path", "name")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _complete_resume(cell: Path) -> Path | None:
    """The last complete resume folder (a save killed half-way leaves the previous one in place)."""
    for d in (cell / RESUME, cell / f".{RESUME}.old"):
        if (d / PROGRESS).is_file():
            return d
    return None


def _save_resume(accelerator, cell: Path, step: int, fp: str, rows: list[dict], position: int) -> None:
    """All processes write into a fresh folder; the main one adds the progress file last and swaps it in.

    accelerate's ``save_state`` holds the model, optimizer, scheduler and every process's RNG states;
    ``progress.json`` holds the step and the data position (sequences consumed of the seeded order)."""
    tmp, final, old = cell / f".{RESUME}.partial", cell / RESUME, cell / f".{RESUME}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_curve(rows, tmp / "curve.parquet")
        progress = {"step": step, "sequences_seen": position, "fingerprint": fp}
        (tmp / PROGRESS).write_text(json.dumps(progress) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_curve(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("step", pa.int64()), ("tokens", pa.int64()), ("loss", pa.float64()),
                        ("lr", pa.float64()), ("grad_norm", pa.float64()), ("tokens_per_s", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _read_curve(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# ----------------------------------------------------------------------------- one cell

def run(s: dict, mixture_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, cell_dir: str | os.PathLike,
        *, device: str = "auto", threads: int | None = None, save_every: int | None = None) -> dict:
    """Train one cell from scratch (or from its resume state); write ``model/`` and ``curve.parquet``.

    Returns a summary (steps, tokens, final loss, parameters, seconds) on every process.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from echochamber import models
    from echochamber.data import tokenizer as ec_tokenizer
    from echochamber.data.mixture import MixtureError, TokenStream, tokenizer_info

    cell = Path(cell_dir)
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    old_threads = torch.get_num_threads()
    if use_cpu and threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, int(threads) // local))
    try:
        try:
            stream = TokenStream(mixture_dir)
            tok = ec_tokenizer.load(tokenizer_dir)
        except (MixtureError, FileNotFoundError) as e:
            raise PretrainError(str(e)) from None
        manifest = stream.manifest
        if tokenizer_info(tok)["vocab_sha256"] != manifest["tokenizer"].get("vocab_sha256"):
            raise PretrainError(f"mixture {mixture_dir} was tokenized with another tokenizer than the one in "
                                f"{tokenizer_dir}; rebuild the mixture")
        L, B = s["seq_len"], s["batch_size"]
        n_seq = stream.n_sequences(L)
        if n_seq < B:
            raise PretrainError(f"mixture {mixture_dir} holds {n_seq} sequences of {L} tokens, fewer than "
                                f"one batch (pretrain.batch_size {B})")
        if s.get("documents", "by_source") == "shuffled":
            stream = stream.shuffled(tok.eos_token_id, s["seed"])   # the same tokens: n_seq holds
        starts = None
        if s.get("windows", "stream") == "document_start":
            starts = stream.document_windows(L, tok.eos_token_id)
        slices = micro_slices(B, s["micro_batch_size"], world, rank)
        steps = total_steps(s, n_seq)

        model = models.build(s["scale"], tok, L, s["seed"],
                             device=accelerator.device if accelerator.device.type == "cuda" else None)
        n_params = models.count_params(model)
        trainer = Trainer(model, accelerator, lr=s["lr"], weight_decay=s["weight_decay"], betas=s["betas"],
                          eps=s["eps"], warmup_steps=s["warmup_steps"], min_lr_ratio=s["min_lr_ratio"],
                          grad_clip=s["grad_clip"], total_steps=steps, decay_steps=s.get("decay_steps"),
                          precision=s["precision"],
                          compile=s["compile"])

        fp = fingerprint(s, manifest)
        step, rows = 0, []
        found = _complete_resume(cell)
        if found is not None:
            try:
                progress = json.loads((found / PROGRESS).read_text())
            except (OSError, json.JSONDecodeError):
                progress = {}
            if progress.get("fingerprint") == fp:
                try:
                    accelerator.load_state(str(found))
                    step, rows = int(progress["step"]), _read_curve(found / "curve.parquet")
                except Exception as e:  # noqa: BLE001 - a damaged resume state is reported, not traced
                    raise PretrainError(f"the resume state {found} is unreadable ({type(e).__name__}); "
                                        f"delete it to train this cell from the start") from None
                if main:
                    log.info("resuming from %s at step %d of %d", found, step, steps)
            elif main:
                log.warning("ignoring %s: it was saved with other settings or another mixture", found)
        accelerator.wait_for_everyone()
        if main:
            log.info("cell %s: %s parameters, %d steps of %d x %d tokens (%d micro-steps x %d processes), "
                     "mixture %d tokens, unigram entropy %.3f nats", cell, f"{n_params:,}", steps, B, L,
                     len(slices), world, stream.n_tokens, manifest.get("unigram_entropy", float("nan")))

        order = Order(n_seq, s["seed"])
        every = int(save_every or SAVE_EVERY)
        bar = tqdm(total=steps, initial=step, disable=not main, file=sys.stderr, ascii=True,
                   mininterval=10, desc="pretrain", dynamic_ncols=False)
        t_start = time.perf_counter()
        while step < steps:
            t0 = time.perf_counter()
            idx = order.indices(step * B, B)
            micro = [torch.from_numpy(stream.sequences(idx[sl], L, starts)).to(accelerator.device, non_blocking=True)
                     for sl in slices]
            loss, grad_norm, lr = trainer.step(micro)
            loss, grad_norm = float(loss.item()), float(grad_norm.item())
            step += 1
            rows.append({"step": step, "tokens": step * B * L, "loss": loss, "lr": float(lr),
                         "grad_norm": grad_norm, "tokens_per_s": B * L / (time.perf_counter() - t0)})
            if not math.isfinite(loss):
                raise PretrainError(f"the loss of cell {cell} became {loss} at step {step}; "
                                    f"lower pretrain.lr or use precision fp32")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step % every == 0 and step < steps:
                _save_resume(accelerator, cell, step, fp, rows, position=step * B)
                if main:
                    log.info("saved the resume state at step %d", step)
        bar.close()
        elapsed = time.perf_counter() - t_start

        accelerator.wait_for_everyone()
        if main:
            final = accelerator.unwrap_model(trainer.model)
            final.config.use_cache = True
            final.set_attn_implementation("sdpa")
            models.save_checkpoint(final, tok, cell / "model")
            with atomic_path(cell / "curve.parquet") as tmp:
                _write_curve(rows, tmp)
            ec_machine.write(cell)      # where this cell was trained
            for d in (RESUME, f".{RESUME}.old", f".{RESUME}.partial"):
                shutil.rmtree(cell / d, ignore_errors=True)
            log.info("cell %s done: final loss %.4f after %d steps, %.1f s", cell, rows[-1]["loss"], steps,
                     elapsed)
        accelerator.wait_for_everyone()
        return {"steps": steps, "tokens": steps * B * L, "final_loss": rows[-1]["loss"], "params": n_params,
                "seconds": elapsed, "processes": world}
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """Command line of one cell, as rule ``pretrain`` runs it::

        accelerate launch workflow_scripts/pretrain.py --settings JSON --mixture DIR --tokenizer DIR --out CELL
    """
    ap = argparse.ArgumentParser(description="Pretrain one cell (mixture x scale x seed).")
    ap.add_argument("--settings", required=True, help="JSON of echochamber.pretrain.settings(...)")
    ap.add_argument("--mixture", required=True, help="mixture folder (holds manifest.json)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder")
    ap.add_argument("--out", required=True, help="the cell folder: model/, curve.parquet, resume/")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for all processes together")
    ap.add_argument("--save-every", type=int, default=None, help=f"steps between resume states ({SAVE_EVERY})")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="sequences per process per micro-step "
                    "(pretrain.micro_batch_size: runtime, so the rule passes it here, not in --settings)")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        s = json.loads(args.settings)
        if args.micro_batch_size:
            s["micro_batch_size"] = args.micro_batch_size
        s.setdefault("micro_batch_size", ec_settings.Pretrain().micro_batch_size)
        run(s, args.mixture, args.tokenizer, args.out, device=args.device, threads=args.threads,
            save_every=args.save_every)
    except PretrainError as e:
        log.error("%s", e)
        print(f"pretrain error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
