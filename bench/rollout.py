"""Generated tokens/s of the rollout engine against transformers' generate, same model, prompts and lengths.

CPU (mini scales, minutes):   python bench/rollout.py
GPU (150M, under 4 minutes):  python bench/rollout.py --device cuda --scale 150M

Random-init OLMo models of config.yaml's scale ladder; EOS is disabled so every row generates exactly
--new-tokens tokens. Each implementation is timed --repeats times (interleaved) and the best run is
reported: wall time on CUDA, process CPU time on CPU (one torch thread by default). On CUDA a first
section checks the engine against an HF forward pass (log-probs of sampled tokens, fp32 and bf16,
eager and CUDA graphs).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import transformers
import yaml
from transformers import OlmoForCausalLM

from echochamber import models
from echochamber.rollout import RolloutBatch, RolloutEngine, SamplingParams, hf_generate

DEFAULTS = {  # device: (scales of config.yaml's ladder, batch, prompt tokens, new tokens)
    "cpu": (["xs", "s", "m"], 64, 32, 128),
    "cuda": (["150M"], 256, 128, 256),
}
VOCAB = {"cpu": 1024, "cuda": 32000}  # the embedded BPE tokenizer; Llama-2's (paper)
PAD = 0


def ladder() -> dict:
    """The scale ladder of config.yaml (xs, s, m for the CPU; 150M and 1B as in the paper)."""
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())["scales"]


def build_model(scale: str, device: str, dtype: torch.dtype) -> OlmoForCausalLM:
    vocab = VOCAB[device]
    cfg = models.olmo_config(ladder()[scale], vocab, eos_id=PAD, pad_id=PAD, max_len=2048)
    cfg.eos_token_id = None  # no EOS: every row generates the full length
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: fast for 150M / 1B
        return OlmoForCausalLM(cfg).to(dtype).eval()


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, transformers {transformers.__version__})"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return (
        f"{cpu or platform.processor()}, {torch.get_num_threads()} torch threads "
        f"(torch {torch.__version__}, transformers {transformers.__version__})"
    )


def timed(fn, device: str) -> tuple[float, RolloutBatch]:
    """Seconds of fn(): wall time on CUDA; on CPU the process's CPU time, so busy neighbours on a shared
    machine do not count (with one thread the two agree on an idle machine)."""
    if device == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start, out


def logprob_error(model, batch: RolloutBatch) -> float:
    """Largest |engine log-prob - HF forward log-prob| over the sampled tokens."""
    ids, mask = batch.sequences()
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    p = batch.prompt_ids.shape[1]
    ref = logits[:, p - 1 : -1].log_softmax(dim=-1).gather(2, batch.response_ids[:, :, None])[:, :, 0]
    return float(((ref - batch.logprobs).abs() * batch.response_mask).max())


def attempt(label: str, fn, *args):
    """fn(*args), or None after printing the error: one failure must not sink a one-shot GPU run."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001
        print(f"{label} FAILED: {error!r}", flush=True)
        return None


def engine_error(model, compile: bool, layout: str) -> float:
    """Sample with the engine (model's dtype) on prompts of different lengths; compare with an HF forward."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 1, 12, 23, 3)]
    engine = RolloutEngine(model, eos_id=vocab, pad_id=PAD, compile=compile, dtype=model.dtype, kv_layout=layout)
    gen = torch.Generator(device=model.device).manual_seed(0)
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.7), generator=gen)
    return logprob_error(model, batch)


def check_cuda(scale: str) -> None:
    """The engine on CUDA (graphs included) against an HF forward, in fp32 and in bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(scale, "cuda", dtype)
        for compile, layout in ((False, "rows"), (True, "rows"), (True, "blocks")):
            label = f"check {dtype!s:14s} compile={compile!s:5s} {layout + ' cache:':12s}"
            err = attempt(label, engine_error, model, compile, layout)
            if err is not None:
                print(f"{label} max |logprob - HF forward| = {err:.2e}", flush=True)
        del model


def bench_scale(scale: str, args) -> dict[str, float | None]:
    """Best tokens/s of each implementation (None when it failed)."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(scale, args.device, dtype)
    vocab = VOCAB[args.device]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7)
    no_eos = vocab  # never sampled
    gen = torch.Generator(device=args.device).manual_seed(0)
    static = {"cache_implementation": "static", "disable_compile": True}  # on CUDA it would compile
    runs = {
        "HF generate, dynamic cache": lambda: hf_generate(model, prompts, params, eos_id=no_eos, pad_id=PAD),
        "HF generate, static cache": lambda: hf_generate(model, prompts, params, eos_id=no_eos, pad_id=PAD, **static),
    }
    engines = {"ours, eager": RolloutEngine(model, eos_id=no_eos, pad_id=PAD)}
    if args.device == "cuda":
        engines["ours, CUDA graphs"] = RolloutEngine(model, eos_id=no_eos, pad_id=PAD, compile=True)
        engines["ours, CUDA graphs, blocked cache"] = RolloutEngine(model, eos_id=no_eos, pad_id=PAD, compile=True,
                                                                    kv_layout="blocks")
    else:  # bf16 matmuls run at twice the fp32 rate on CPUs with AVX512-BF16 / AMX
        engines["ours, bf16 (not exact)"] = RolloutEngine(model, eos_id=no_eos, pad_id=PAD, dtype=torch.bfloat16)
    for name, engine in engines.items():
        runs[name] = lambda engine=engine: engine.generate(prompts, params, generator=gen)
    if args.device == "cuda" and args.sdpa_backends:  # the row cache's attention pinned to each SDPA kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            engine = RolloutEngine(model, eos_id=no_eos, pad_id=PAD, compile=True)
            name = f"ours, CUDA graphs, SDPA {backend.name}"
            engines[name] = engine

            def pinned(engine=engine, backend=backend):
                with sdpa_kernel([backend]):  # graphs are captured on the first call, inside this
                    return engine.generate(prompts, params, generator=gen)

            runs[name] = pinned

    warm = SamplingParams(max_new_tokens=min(8, args.new_tokens), temperature=0.7)
    hf_generate(model, prompts, warm, eos_id=no_eos, pad_id=PAD)  # every row: the first full batch loads kernels
    ok = dict.fromkeys(runs, True)
    for name in engines:  # warm up, capturing every graph the timed runs use
        ok[name] = attempt(f"{scale} {name} warm-up", runs[name]) is not None
    tokens = args.batch * args.new_tokens

    def run_timed(fn) -> float:
        seconds, out = timed(fn, args.device)
        if out.response_mask.sum() != tokens:
            raise RuntimeError(f"generated {int(out.response_mask.sum())} tokens, not {tokens}")
        return seconds

    best, spent = dict.fromkeys(runs, math.inf), dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            if not ok[name] or (spent[name] and spent[name] + best[name] > args.budget_s):
                continue  # repeat a run only while its total time stays within the budget
            seconds = attempt(f"{scale} {name}", run_timed, fn)
            ok[name] = seconds is not None
            if ok[name]:
                best[name], spent[name] = min(best[name], seconds), spent[name] + seconds
    if args.profile and ok.get("ours, CUDA graphs"):
        profile(runs["ours, CUDA graphs"])
    return {name: tokens / best[name] if ok[name] else None for name in runs}


def profile(fn) -> None:
    """Where one call's time goes: the CUDA kernels (graph replays included) and the host-side ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="device_time_total", row_limit=15, max_name_column_width=60), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--scale", choices=list(ladder()), action="append", help="repeatable; default per device")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="repeat a run while its total stays below this")
    parser.add_argument("--skip-check", action="store_true", help="CUDA: skip the correctness check")
    parser.add_argument("--profile", action="store_true", help="CUDA: profile one call of the CUDA-graph engine")
    parser.add_argument("--sdpa-backends", action="store_true", help="CUDA: also time the engine with each SDPA kernel")
    args = parser.parse_args()
    scales, batch, prompt_len, new_tokens = DEFAULTS[args.device]
    args.scale = args.scale or scales
    args.batch, args.prompt_len = args.batch or batch, args.prompt_len or prompt_len
    args.new_tokens = args.new_tokens or new_tokens
    torch.set_num_threads(args.threads)

    print(f"machine: {machine(args.device)}")
    print(f"batch {args.batch}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, temperature 0.7, no EOS")
    if args.device == "cuda" and not args.skip_check:
        check_cuda(args.scale[0])
    print("\n| scale | implementation | tokens/s | vs HF dynamic |\n|---|---|---:|---:|")
    for scale in args.scale:
        rates = bench_scale(scale, args)
        reference = rates["HF generate, dynamic cache"]
        for name, rate in rates.items():
            ratio = f"{rate / reference:.2f}x" if rate and reference else "-"
            print(f"| {scale} | {name} | {f'{rate:,.0f}' if rate else 'failed'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
