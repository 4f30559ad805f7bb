"""Training throughput: our training step (echochamber.pretrain.Trainer) vs a minimal plain-PyTorch loop.

    python bench/train.py                  CPU: a mini scale, ours vs plain on the same model and batch
    python bench/train.py --device cuda    GPU: 150M and 1B at context 2048, tokens/s and MFU

On the CPU it also times the model's own GEMMs (forward and both backward products of every linear
layer at the benchmark's micro-batch, same threads, same run) and reports training FLOP/s per core as
a ratio to that measured matmul throughput: how close the training step runs to this machine's limit.

Both loops start from the same weights and see the same micro-batches. The plain loop is what a
transformers user writes: ``model(input_ids, labels=input_ids).loss``, backward per micro-batch, clip,
AdamW (fused on CUDA), zero_grad; on the GPU under bf16 autocast. Ours adds what training uses:
accelerate, causal SDPA without a mask (flash), and torch.compile when asked (on by default on GPU).

MFU = tokens/s x (6 N + 12 L d T) / peak, with N the parameters that do matmul work per token
(everything but the input embedding table; a tied table counts once, as the output head), L layers,
d width, T context (the attention term of PaLM / nanoGPT, counting the full T x T scores), and peak the
dense bf16 peak (989 TFLOP/s for H100 SXM and H200). The GPU mode is one command of about 3 minutes;
it prints the card's name first and one line per measurement as it goes, then a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echochamber import models  # noqa: E402
from echochamber.pretrain import Trainer  # noqa: E402

ANCHORS = {"150M": {"eager": 0.29, "compiled": 0.38}, "1B": {"eager": 0.45, "compiled": 0.52}}  # H200, plain loop
TARGETS = {"150M": 0.45, "1B": 0.55}
GPU_MICRO = {"150M": 16, "1B": 8}


def ladder() -> dict:
    """The scale ladder of config.yaml: the mini scales and the paper's 150M and 1B."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    return cfg["scales"]


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    return 6 * models.count_params(model, embeddings=False) + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def make_model(scale: dict, vocab: int, seq_len: int, device: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = models.olmo_config(scale, vocab, eos_id=0, pad_id=1, max_len=seq_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide its matmul speed."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'}; torch uses {torch.backends.cpu.get_cpu_capability()})"


def gemm_gflops(model, rows: int, repeats: int = 5) -> float:
    """GFLOP/s of the matrix products one training step of ``model`` does over ``rows`` tokens: for each
    linear layer (out x in) the forward (rows x in) @ (in x out) and the two backward products, timed
    back to back (best of ``repeats``) with the current torch threads."""
    shapes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            shapes += [(rows, in_f, out_f), (rows, out_f, in_f), (in_f, rows, out_f)]
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = float("inf")
    for _ in range(repeats + 1):                      # the first pass warms up
        t = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


class Plain:
    """The reference loop: nothing but transformers, torch.autocast and AdamW."""

    def __init__(self, model, *, bf16: bool, compile: bool):
        self.model = model
        self.forward = torch.compile(model) if compile else model
        fused = {"fused": True} if next(model.parameters()).is_cuda else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.1, **fused)
        self.autocast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, micro):
        total = 0.0
        for ids in micro:
            with self.autocast:
                loss = self.forward(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / len(micro)).backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / len(micro)


class Ours:
    def __init__(self, model, accelerator, *, bf16: bool, compile: bool):
        self.trainer = Trainer(model, accelerator, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                               warmup_steps=10, min_lr_ratio=0.1, grad_clip=1.0, total_steps=10_000,
                               precision="bf16" if bf16 else "fp32", compile=compile)

    def step(self, micro):
        return self.trainer.step(micro)[0]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(loop, micro, device) -> float:
    _sync(device)
    t = time.perf_counter()
    loop.step(micro).item()
    _sync(device)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- CPU

def cpu_bench(args) -> dict:
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    scale = ladder()[args.scale]
    device = torch.device("cpu")
    base = make_model(scale, args.vocab, args.seq_len, "cpu")
    accelerator = Accelerator(cpu=True)
    ours, plain = Ours(copy.deepcopy(base), accelerator, bf16=False, compile=False), \
        Plain(copy.deepcopy(base), bf16=False, compile=False)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    micro = list(batch.split(args.micro_batch_size))
    for _ in range(args.warmup):
        timed_step(ours, micro, device)
        timed_step(plain, micro, device)
    times = {"ours": [], "plain": []}
    for i in range(args.steps):            # interleaved, so load from other jobs hits both alike
        order = (("ours", ours), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("ours", ours))
        for name, loop in order:
            times[name].append(timed_step(loop, micro, device))
    tokens = args.batch_size * args.seq_len
    result = {"device": "cpu", "cpu": cpu_name(), "threads": args.threads, "scale": args.scale,
              "params": models.count_params(base), "tokens_per_step": tokens}
    for name, ts in times.items():
        result[f"{name}_tokens_per_s"] = round(tokens / statistics.median(ts), 1)
    # The machine's limit for this model: its own GEMMs (forward and both backward products of every
    # linear layer, at this micro-batch), timed now on the same threads.
    gemm = gemm_gflops(base, args.micro_batch_size * args.seq_len, repeats=5)
    per_core = result["ours_tokens_per_s"] * flops_per_token(base, args.seq_len) / 1e9 / args.threads
    result.update(gflops_per_core=round(per_core, 2), gemm_gflops_per_core=round(gemm / args.threads, 2),
                  ratio_to_gemm=round(per_core * args.threads / gemm, 3))
    # The ratio is the median over neighbouring pairs of steps, which cancels slow drifts in the load
    # that other jobs put on a shared machine; the min-based ratio is printed beside it.
    result["ratio"] = round(statistics.median(p / o for o, p in zip(times["ours"], times["plain"])), 3)
    result["ratio_of_fastest"] = round(min(times["plain"]) / min(times["ours"]), 3)
    print(f"CPU, {args.threads} threads, scale {args.scale} ({result['params']:,} parameters), "
          f"{args.batch_size} x {args.seq_len} tokens per step, {args.steps} interleaved steps each: "
          f"ours {result['ours_tokens_per_s']:.0f} tokens/s, plain {result['plain_tokens_per_s']:.0f} tokens/s "
          f"(medians); ours/plain {result['ratio']:.3f} (median of pairs; fastest steps: "
          f"{result['ratio_of_fastest']:.3f}; target >= 0.9)", flush=True)
    print(f"{result['cpu']}: training runs at {result['gflops_per_core']:.1f} GFLOP/s per core, the model's own "
          f"GEMMs at {result['gemm_gflops_per_core']:.1f} GFLOP/s per core: {result['ratio_to_gemm']:.0%} of "
          f"this machine's matmul throughput", flush=True)
    return result


# ----------------------------------------------------------------------------- GPU

def gpu_measure(name: str, scale_name: str, variant: str, args, accelerator) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    scale = ladder()[scale_name]
    micro_size = args.micro_batch_size or GPU_MICRO.get(scale_name, 16)
    n_micro = args.accumulation
    while True:
        model = loop = None
        try:
            model = make_model(scale, args.vocab, args.seq_len, args.device)
            fpt = flops_per_token(model, args.seq_len)
            if variant == "ours":
                loop = Ours(model, accelerator, bf16=True, compile=not args.no_compile)
            else:
                loop = Plain(model, bf16=True, compile=variant == "plain-compiled")
            g = torch.Generator(device=args.device).manual_seed(0)
            micro = [torch.randint(0, args.vocab, (micro_size, args.seq_len), device=device, generator=g)
                     for _ in range(n_micro)]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                timed_step(loop, micro, device)
            warm = time.perf_counter() - t0
            ts = [timed_step(loop, micro, device) for _ in range(args.steps)]
            break
        except torch.cuda.OutOfMemoryError:
            del model, loop
            gc.collect()
            torch.cuda.empty_cache()
            if micro_size == 1:
                raise
            micro_size, n_micro = micro_size // 2, n_micro * 2
            print(f"  {name}: out of memory, retrying with micro-batch {micro_size} x {n_micro}", flush=True)
    tokens = micro_size * n_micro * args.seq_len
    tps = tokens / statistics.median(ts)
    mfu = tps * fpt / (args.peak_tflops * 1e12)
    r = {"scale": scale_name, "variant": variant, "micro_batch": micro_size, "accumulation": n_micro,
         "tokens_per_step": tokens, "tokens_per_s": round(tps), "mfu": round(mfu, 4),
         "step_s": round(statistics.median(ts), 4), "warmup_s": round(warm, 1),
         "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
         "params": models.count_params(model), "flops_per_token": fpt}
    print(f"{scale_name:>5} {variant:<15} {r['tokens_per_s']:>9,} tokens/s  MFU {mfu:6.1%}  "
          f"step {r['step_s']:.3f}s ({micro_size} x {n_micro} x {args.seq_len})  warm-up {warm:.0f}s  "
          f"peak {r['peak_mem_gib']} GiB", flush=True)
    del model, loop, micro
    accelerator.free_memory()
    accelerator._custom_objects.clear()        # the registered scheduler holds the optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


def gpu_bench(args) -> dict:
    from accelerate import Accelerator

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    start = time.perf_counter()
    name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test of the GPU suite)"
    memory = f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if cuda else ""
    print(f"GPU: {name}{memory}, torch {torch.__version__}, peak {args.peak_tflops:.0f} TFLOP/s bf16 dense, "
          f"context {args.seq_len}", flush=True)
    accelerator = Accelerator(mixed_precision="no", cpu=not cuda)
    plan = [(s, v) for v in args.variants for s in args.scales]      # ours at every scale first
    results, skipped = [], []
    for scale_name, variant in plan:
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{scale_name}/{variant}")
            print(f"{scale_name:>5} {variant:<15} skipped: the {args.budget_s:.0f}s budget is spent", flush=True)
            continue
        try:
            results.append(gpu_measure(f"{scale_name}/{variant}", scale_name, variant, args, accelerator))
        except Exception as e:  # noqa: BLE001 - report and go on to the next measurement
            print(f"{scale_name:>5} {variant:<15} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            skipped.append(f"{scale_name}/{variant}")
    for r in results:
        if r["variant"] == "ours":
            r["target_mfu"] = TARGETS.get(r["scale"])
            r["anchor_plain_h200"] = ANCHORS.get(r["scale"])
    return {"device": name, "torch": torch.__version__, "results": results,
            "skipped": skipped, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--scale", default="s", help="CPU: a scale of config.yaml (default s)")
    ap.add_argument("--scales", nargs="+", default=["150M", "1B"],
                    help="GPU suite: scales (the paper's or config.yaml's)")
    ap.add_argument("--suite", choices=["auto", "cpu", "gpu"], default="auto",
                    help="auto: the GPU suite on cuda, the CPU comparison on cpu (gpu on cpu: a smoke test)")
    ap.add_argument("--variants", nargs="+", default=["ours", "plain-eager"],
                    choices=["ours", "plain-eager", "plain-compiled"], help="GPU: loops to time, in order")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, 2048 on GPU")
    ap.add_argument("--batch-size", type=int, default=32, help="CPU: sequences per step")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="CPU default: the batch size; GPU default: 16 (150M) / 8 (1B)")
    ap.add_argument("--accumulation", type=int, default=4, help="GPU: micro-batches per optimizer step")
    ap.add_argument("--vocab", type=int, default=None, help="default: 1024 on CPU, 32000 (Llama-2) on GPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CPU, 6 GPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="GPU: run ours without torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--budget-s", type=float, default=160.0, help="GPU: start no measurement after this")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    gpu = args.suite == "gpu" or (args.suite == "auto" and args.device == "cuda")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.vocab = args.vocab or (32000 if gpu else 1024)
    args.steps = args.steps or (6 if gpu else 20)
    if not gpu:
        args.micro_batch_size = args.micro_batch_size or args.batch_size
    summary = gpu_bench(args) if gpu else cpu_bench(args)
    print(json.dumps(summary, indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
