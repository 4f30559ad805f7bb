"""Generated tokens/s of the rollout engine against transformers' generate, same model, prompts and lengths.

CPU (mini scales, minutes):   python bench/rollout.py
GPU (150M, under 4 minutes):  python bench/rollout.py --device cuda --scale 150M

Random-init OLMo models; EOS is disabled so every row generates exactly --new-tokens tokens. Each
implementation is timed --repeats times (interleaved) and the best run is reported. On CUDA a first
section checks the engine against an HF forward pass (log-probs of sampled tokens, fp32 and bf16).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers
from transformers import OlmoConfig, OlmoForCausalLM

from echochamber.rollout import RolloutBatch, RolloutEngine, SamplingParams, hf_generate

SCALES = {  # name: (d_model, layers, heads, mlp hidden, vocab, tied)
    "d128": (128, 4, 4, 512, 1024, False),
    "d256": (256, 6, 8, 1024, 1024, False),
    "150M": (768, 12, 12, 3072, 32000, False),
    "1B": (2048, 16, 16, 8192, 32000, True),
}
DEFAULTS = {  # device: (scales, batch, prompt tokens, new tokens)
    "cpu": (["d128", "d256"], 64, 32, 128),
    "cuda": (["150M"], 256, 128, 256),
}
PAD = 0


def build_model(scale: str, device: str, dtype: torch.dtype) -> OlmoForCausalLM:
    d, layers, heads, mlp, vocab, tied = SCALES[scale]
    cfg = OlmoConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return OlmoForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, transformers {transformers.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return (
        f"{cpu or platform.processor()}, {torch.get_num_threads()} torch threads "
        f"(torch {torch.__version__}, transformers {transformers.__version__})"
    )


def timed(fn, device: str) -> tuple[float, RolloutBatch]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def logprob_error(model, batch: RolloutBatch) -> float:
    """Largest |engine log-prob - HF forward log-prob| over the sampled tokens."""
    ids, mask = batch.sequences()
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    p = batch.prompt_ids.shape[1]
    ref = logits[:, p - 1 : -1].log_softmax(dim=-1).gather(2, batch.response_ids[:, :, None])[:, :, 0]
    return float(((ref - batch.logprobs).abs() * batch.response_mask).max())


def check_cuda(scale: str) -> None:
    """The engine on CUDA (graphs included) against an HF forward, in fp32 and in bf16."""
    params = SamplingParams(max_new_tokens=32, temperature=0.7)
    vocab = SCALES[scale][4]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 1, 12, 23, 3)]
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(scale, "cuda", dtype)
        for compile in (False, True):
            engine = RolloutEngine(model, eos_id=vocab, pad_id=PAD, compile=compile, dtype=dtype)
            gen = torch.Generator(device="cuda").manual_seed(0)
            err = logprob_error(model, engine.generate(prompts, params, generator=gen))
            print(f"check {str(dtype):15s} compile={compile!s:5s}: max |logprob - HF forward| = {err:.2e}")
        del model, engine


def bench_scale(scale: str, args) -> list[tuple[str, float]]:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(scale, args.device, dtype)
    vocab = SCALES[scale][4]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7)
    no_eos = vocab  # never sampled
    gen = torch.Generator(device=args.device).manual_seed(0)
    runs = {
        "HF generate, dynamic cache": lambda: hf_generate(model, prompts, params, eos_id=no_eos, pad_id=PAD),
        "HF generate, static cache": lambda: hf_generate(
            model, prompts, params, eos_id=no_eos, pad_id=PAD, cache_implementation="static"
        ),
    }
    engines = {"ours, eager": RolloutEngine(model, eos_id=no_eos, pad_id=PAD)}
    if args.device == "cuda":
        engines["ours, CUDA graphs"] = RolloutEngine(model, eos_id=no_eos, pad_id=PAD, compile=True)
    for name, engine in engines.items():
        runs[name] = lambda engine=engine: engine.generate(prompts, params, generator=gen)

    warm = SamplingParams(max_new_tokens=min(8, args.new_tokens), temperature=0.7)
    hf_generate(model, prompts[:2], warm, eos_id=no_eos, pad_id=PAD)
    for engine in engines.values():  # warm up (and capture every graph the timed runs use)
        engine.generate(prompts, params, generator=gen)
    best = {name: float("inf") for name in runs}
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            if spent[name] > args.budget_s:
                continue  # a slow run is repeated only while its time stays within the budget
            seconds, out = timed(fn, args.device)
            assert out.response_mask.sum() == args.batch * args.new_tokens
            best[name] = min(best[name], seconds)
            spent[name] += seconds
    tokens = args.batch * args.new_tokens
    return [(name, tokens / seconds) for name, seconds in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--scale", choices=list(SCALES), action="append", help="repeatable; default per device")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop repeating a run once it took this long")
    parser.add_argument("--skip-check", action="store_true", help="CUDA: skip the correctness check")
    args = parser.parse_args()
    scales, batch, prompt_len, new_tokens = DEFAULTS[args.device]
    args.scale = args.scale or scales
    args.batch, args.prompt_len = args.batch or batch, args.prompt_len or prompt_len
    args.new_tokens = args.new_tokens or new_tokens
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {machine(args.device)}")
    print(f"batch {args.batch}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, temperature 0.7, no EOS")
    if args.device == "cuda" and not args.skip_check:
        check_cuda(args.scale[0])
    print("\n| scale | implementation | tokens/s | vs HF dynamic |\n|---|---|---:|---:|")
    for scale in args.scale:
        rows = bench_scale(scale, args)
        reference = dict(rows)["HF generate, dynamic cache"]
        for name, rate in rows:
            print(f"| {scale} | {name} | {rate:,.0f} | {rate / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
