"""The reference backends, same semantics and return type as the engine: ``hf_generate`` (``transformers``
``generate``, what the engine is tested against) and ``vllm_generate`` (optional, when ``HAS_VLLM``).
"""

from __future__ import annotations

import importlib.util

import torch

from echochamber.rollout.sampling import RolloutBatch, SamplingParams
from echochamber.tensors import left_pad, right_pad, token_logprobs

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@torch.no_grad()  # not inference_mode: trainers use the outputs in autograd graphs
def hf_generate(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> RolloutBatch:
    """The ``transformers`` ``generate`` reference, same semantics and return type as the engine.

    ``top_k`` is passed explicitly (``generate`` would otherwise apply its default of 50). ``generate``
    takes no generator, so one seeds the global RNG inside a forked RNG state. ``generate_kwargs`` go
    to ``generate`` (e.g. ``cache_implementation="static"``).
    """
    device = model.lm_head.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    kwargs = dict(
        attention_mask=mask.long(),
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=True,
        **({} if params.greedy else sampling),
        **generate_kwargs,
    )
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(ids, **kwargs)
    response = out.sequences[:, ids.shape[1] :]
    logprobs = token_logprobs(torch.stack(out.logits, dim=1), response)  # raw logits, temperature 1
    is_eos = response == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    response_mask = ~after_eos
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response.masked_fill(after_eos, pad_id),
        response_mask=response_mask,
        logprobs=logprobs.masked_fill(after_eos, 0.0),
        truncated=~is_eos.any(dim=1),
    )


def vllm_generate(
    llm,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    seed: int = 0,
) -> RolloutBatch:
    """Optional vLLM backend (``pip install vllm``; use it when ``HAS_VLLM``), same return type.

    ``llm`` is a ``vllm.LLM`` or the path of a ``save_pretrained`` checkpoint. Only ``eos_id`` stops a
    row; log-probs are vLLM's raw ones (temperature 1) under its default ``logprobs_mode``.
    """
    import vllm

    if isinstance(llm, str):
        llm = vllm.LLM(model=llm, seed=seed, skip_tokenizer_init=True)
    sampling = vllm.SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        stop_token_ids=[eos_id],
        ignore_eos=True,  # the checkpoint's own EOS; stop_token_ids still apply
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,
        seed=seed,
    )
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sampling)]
    ids, mask = left_pad(prompts, pad_id, "cpu")
    tokens = [list(o.token_ids) for o in outputs]
    response, response_mask = right_pad(tokens, pad_id)
    logprobs, _ = right_pad([[step[t].logprob for step, t in zip(o.logprobs, ts)] for o, ts in zip(outputs, tokens)],
                            0.0, dtype=torch.float)
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs,
        truncated=torch.tensor([o.finish_reason == "length" for o in outputs]),
    )
