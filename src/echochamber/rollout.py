"""Fast batched sampling from an OLMo causal LM: our own forward, KV cache and decode loop.

``RolloutEngine`` reads the weights of a ``transformers`` ``OlmoForCausalLM`` and runs its own forward
pass (prefill of the left-padded prompts, then one token per step) over a preallocated KV cache of shape
``[layers, 2, batch, kv_heads, max_len, head_dim]``. Position ids start at 0 at each prompt's first real
token, exactly as ``generate`` derives them from an attention mask, so greedy decoding equals
``hf_generate`` token for token in fp32. Rows stop independently at EOS; once at most half of the rows
are still running, the cache is compacted so finished rows cost nothing.

Sampling: temperature, then top-k (off when 0), then top-p (the smallest set of tokens whose probability
reaches ``top_p``), then an exact draw from the remaining distribution (exponential race) with an optional
``torch.Generator`` on the model's device. ``logprobs`` are always under the model at temperature 1.

On CUDA the engine runs in bf16 by default; ``compile=True`` captures the decode step in CUDA graphs (one
per batch-size bucket and 64-key attention window), sampling stays eager. On CPU ``compile=True`` runs
the same fixed-shape step without capturing, so that path is tested everywhere.

``hf_generate`` is the reference (``transformers`` ``generate``), ``vllm_generate`` an optional backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LN_EPS = 1e-5  # OlmoLayerNorm's fixed epsilon
_KEY_BLOCK = 64  # graph mode attends over the filled prefix rounded up to this many keys
_CUDA_CHECK_EVERY = 8  # on CUDA, read the finished flags (a host sync) every this many steps


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class RolloutBatch:
    prompt_ids: torch.LongTensor  # [B, P] left-padded with pad_id
    prompt_mask: torch.BoolTensor  # [B, P]
    response_ids: torch.LongTensor  # [B, T] right-padded with pad_id (T = longest response)
    response_mask: torch.BoolTensor  # [B, T] True for generated tokens up to and including EOS
    logprobs: torch.FloatTensor  # [B, T] log-prob of each sampled token at temperature 1 (0 where masked)
    truncated: torch.BoolTensor  # [B] True when the response hit max_new_tokens without EOS

    def sequences(self) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Prompt + response ids and their attention mask, for a training forward pass."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask


# ---------------------------------------------------------------------------------------------- sampling


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k (if ``top_k`` > 0) and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose total probability is >= ``top_p``: a token
    stays when the probability of the tokens ranked above it is still below ``top_p``, so the most
    likely token always stays.
    """
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        drop = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """One token per row of ``logits`` [n, vocab] (fp32) under ``params``."""
    if params.greedy or params.top_k == 1:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    probs = filter_logits(scores, params.top_k, params.top_p).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p; the clamp keeps E = 0 from making 0/0
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def _token_logprobs(logits: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    return logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(dim=-1)


# ---------------------------------------------------------------------------------------------- helpers


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    mask = torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]
    return ids.to(device), mask.to(device)


def _concat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Stack per-chunk results: prompts left-padded and responses right-padded to common widths."""
    if len(batches) == 1:
        return batches[0]
    p = max(b.prompt_ids.shape[1] for b in batches)
    t = max(b.response_ids.shape[1] for b in batches)

    def pad(x, width, value, left):
        extra = width - x.shape[1]
        return F.pad(x, (extra, 0) if left else (0, extra), value=value)

    return RolloutBatch(
        prompt_ids=torch.cat([pad(b.prompt_ids, p, pad_id, True) for b in batches]),
        prompt_mask=torch.cat([pad(b.prompt_mask, p, False, True) for b in batches]),
        response_ids=torch.cat([pad(b.response_ids, t, pad_id, False) for b in batches]),
        response_mask=torch.cat([pad(b.response_mask, t, False, False) for b in batches]),
        logprobs=torch.cat([pad(b.logprobs, t, 0.0, False) for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
    )


def _rope_tables(config, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [length, head_dim] so that rope(x) = x * cos + x.roll(half) * sin."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RolloutEngine supports only default RoPE, not {rope['rope_type']!r}")
    dim = _head_dim(config)
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    freqs = torch.arange(length, device=device)[:, None].float() * inv_freq  # as OlmoRotaryEmbedding
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=_LN_EPS).to(x.dtype)


# ---------------------------------------------------------------------------------------------- engine


def _copy_stacked(dst: torch.Tensor, *parts: torch.Tensor) -> None:
    """dst = cat(parts) along dim 0, in place (casting to dst's dtype)."""
    start = 0
    for part in parts:
        dst[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]


class _Weights:
    """The model's weights in the engine's dtype, q/k/v and gate/up fused, stacked over layers.

    The tensors keep their addresses for the engine's lifetime (CUDA graphs point at them); ``load``
    copies the model's current values into them.
    """

    def __init__(self, model, dtype):
        cfg = model.config
        dev = model.lm_head.weight.device
        d, n = cfg.hidden_size, cfg.num_hidden_layers
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * _head_dim(cfg)
        attn = cfg.num_attention_heads * _head_dim(cfg)
        ff = cfg.intermediate_size

        def empty(*shape):
            return torch.empty(*shape, device=dev, dtype=dtype)

        self.embed = empty(cfg.vocab_size, d)
        self.lm_head = self.embed if cfg.tie_word_embeddings else empty(cfg.vocab_size, d)
        self.qkv, self.o = empty(n, qkv, d), empty(n, d, attn)
        self.gate_up, self.down = empty(n, 2 * ff, d), empty(n, d, ff)
        self.qkv_bias = empty(n, qkv) if cfg.attention_bias else None
        self.o_bias = empty(n, d) if cfg.attention_bias else None
        self.load(model)

    @torch.no_grad()
    def load(self, model) -> None:
        self.embed.copy_(model.model.embed_tokens.weight)
        if self.lm_head is not self.embed:
            self.lm_head.copy_(model.lm_head.weight)
        for i, layer in enumerate(model.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            _copy_stacked(self.qkv[i], att.q_proj.weight, att.k_proj.weight, att.v_proj.weight)
            self.o[i].copy_(att.o_proj.weight)
            _copy_stacked(self.gate_up[i], mlp.gate_proj.weight, mlp.up_proj.weight)
            self.down[i].copy_(mlp.down_proj.weight)
            if self.qkv_bias is not None:
                _copy_stacked(self.qkv_bias[i], att.q_proj.bias, att.k_proj.bias, att.v_proj.bias)
                self.o_bias[i].copy_(att.o_proj.bias)


class _Graphs:
    """CUDA graphs of the decode step, one per (batch rows, attended keys), sharing static inputs."""

    def __init__(self, engine: RolloutEngine, rows: int):
        dev = engine.device
        self.engine = engine
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write = torch.zeros(1, dtype=torch.long, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, tokens, positions, write: int, keys: int) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.write.fill_(write)
        if (n, keys) not in self.graphs:
            self.graphs[(n, keys)] = self._capture(n, keys)
        graph, logits = self.graphs[(n, keys)]
        graph.replay()
        return logits

    def _capture(self, n: int, keys: int):
        args = (self.tokens[:n], self.positions[:n], self.write, keys)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
            self.engine._step(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.engine._step(*args)
        return graph, logits


class RolloutEngine:
    """Batched sampling from an ``OlmoForCausalLM`` with our own forward and preallocated KV cache.

    ``max_len`` caps prompt + response length (default: whatever each call needs). ``compile`` captures
    the decode step in CUDA graphs on CUDA. ``dtype`` defaults to bf16 on CUDA and the model's dtype
    elsewhere. Call ``refresh`` after the optimizer has changed the model.
    """

    def __init__(
        self,
        model,
        *,
        eos_id: int,
        pad_id: int,
        max_len: int | None = None,
        compile: bool = False,
        dtype: torch.dtype | None = None,
    ):
        cfg = model.config
        if cfg.hidden_act != "silu":
            raise ValueError(f"RolloutEngine supports SwiGLU (hidden_act 'silu'), not {cfg.hidden_act!r}")
        self.model, self.config = model, cfg
        self.eos_id, self.pad_id, self.max_len = eos_id, pad_id, max_len
        self.device = model.lm_head.weight.device
        default = torch.bfloat16 if self.device.type == "cuda" else model.lm_head.weight.dtype
        self.dtype = dtype or default
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg)
        self.compile = compile
        self.weights = _Weights(model, self.dtype)
        self.cache: torch.Tensor | None = None  # [layers, 2, rows, kv_heads, length, head_dim]
        self.key_valid: torch.Tensor | None = None  # [rows, length]: which cache slots hold real tokens
        self.graphs: _Graphs | None = None

    def refresh(self) -> None:
        """Copy the model's current weights into the engine (in place, so CUDA graphs stay valid)."""
        self.weights.load(self.model)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> RolloutBatch:
        """Sample one response per prompt; ``batch_size`` bounds the rows decoded together."""
        if not prompts or not all(prompts):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        step = batch_size or len(prompts)
        chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
        return _concat([self._generate(chunk, params, generator) for chunk in chunks], self.pad_id)

    # ------------------------------------------------------------------------------------ decode loop

    def _generate(self, prompts, params: SamplingParams, generator) -> RolloutBatch:
        ids, mask = _left_pad(prompts, self.pad_id, self.device)
        b, p = ids.shape
        t_max = params.max_new_tokens
        self._reserve(b, p + t_max)
        lengths = mask.sum(dim=1)
        out_ids = torch.full((b + 1, t_max), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros(b + 1, t_max, dtype=torch.float, device=self.device)  # row b: padding slots
        done = torch.zeros(b + 1, dtype=torch.bool, device=self.device)
        done[b] = True
        n_out = torch.zeros(b + 1, dtype=torch.long, device=self.device)

        rows = torch.arange(b, device=self.device)  # output row of each cache slot
        logits = self._prefill(ids, mask)
        check_every = _CUDA_CHECK_EVERY if self.device.type == "cuda" else 1
        for t in range(t_max):
            tokens = sample_tokens(logits, params, generator)
            live = ~done[rows]
            tokens = torch.where(live, tokens, self.pad_id)
            out_ids[rows, t] = tokens
            out_lp[rows, t] = torch.where(live, _token_logprobs(logits, tokens), 0.0)
            n_out[rows] += live
            done[rows] |= tokens == self.eos_id
            if t == t_max - 1:
                break
            if (t + 1) % check_every == 0:
                n_live = int((~done[rows]).sum())
                if n_live == 0:
                    break
                if n_live <= rows.shape[0] // 2:
                    rows, tokens = self._compact(rows, done, tokens, n_live, p + t + 1)
            logits = self._decode(tokens, lengths[rows.clamp(max=b - 1)] + t, p + t)

        t_used = int(n_out.max())
        response_mask = torch.arange(t_used, device=self.device) < n_out[:b, None]
        return RolloutBatch(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=out_ids[:b, :t_used],
            response_mask=response_mask,
            logprobs=out_lp[:b, :t_used],
            truncated=~done[:b],
        )

    def _compact(self, rows, done, tokens, n_live: int, filled: int):
        """Move the running rows to the front of the cache; graph mode pads to a power of two."""
        keep = (~done[rows]).nonzero()[:, 0]
        n = 1 << (n_live - 1).bit_length() if self._graphed() else n_live
        sentinel = done.shape[0] - 1  # slots past the running rows write to the spare output row
        new_rows = torch.full((n,), sentinel, dtype=torch.long, device=self.device)
        new_rows[:n_live] = rows[keep]
        new_tokens = torch.full((n,), self.pad_id, dtype=torch.long, device=self.device)
        new_tokens[:n_live] = tokens[keep]
        self.cache[:, :, :n_live, :, :filled] = self.cache[:, :, keep, :, :filled]
        self.key_valid[:n_live, :filled] = self.key_valid[keep, :filled]
        return new_rows, new_tokens

    def _graphed(self) -> bool:
        return self.compile and self.device.type == "cuda"

    def _reserve(self, rows: int, length: int) -> None:
        """Make sure the cache holds ``rows`` sequences of ``length`` tokens."""
        if self.max_len is not None and length > self.max_len:
            raise ValueError(f"prompt + max_new_tokens = {length} exceeds the engine's max_len {self.max_len}")
        if self.cache is not None and self.cache.shape[2] >= rows and self.cache.shape[4] >= length:
            return
        length = -(-max(length, self.max_len or 0) // _KEY_BLOCK) * _KEY_BLOCK
        shape = (self.config.num_hidden_layers, 2, rows, self.kv_heads, length, self.head_dim)
        self.cache = self.graphs = None  # free the old buffers first
        self.cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.key_valid = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
        self.cos, self.sin = _rope_tables(self.config, length, self.device, self.dtype)
        if self._graphed():
            self.graphs = _Graphs(self, rows)

    # ------------------------------------------------------------------------------------ forward

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts, fill the cache, return fp32 logits at the last position [b, vocab]."""
        b, p = ids.shape
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self.key_valid[:b].zero_()
        self.key_valid[:b, :p] = mask
        causal = torch.ones(p, p, dtype=torch.bool, device=self.device).tril()
        # a padding query sees only itself, so no row of the softmax is empty
        attn_mask = (causal & mask[:, None, :]) | torch.eye(p, dtype=torch.bool, device=self.device)
        cache = self.cache[:, :, :b, :, :p]

        def attend(layer, q, k, v):
            cache[layer, 0].copy_(k)
            cache[layer, 1].copy_(v)
            return self._attention(q, k, v, attn_mask[:, None])

        x = self._forward(ids, positions, attend)
        return self._logits(x[:, -1])

    def _decode(self, tokens, positions, write: int) -> torch.Tensor:
        keys = -(-(write + 1) // _KEY_BLOCK) * _KEY_BLOCK  # the cache length is a multiple of the block
        if self.graphs is not None:
            return self.graphs.run(tokens, positions, write, keys)
        if self.compile:  # the graphed step, run eagerly (CPU): fixed shapes, write index as a tensor
            return self._step(tokens, positions, torch.tensor([write], device=self.device), keys)
        return self._step(tokens, positions, write, write + 1)

    def _step(self, tokens, positions, write, keys: int) -> torch.Tensor:
        """One decode step: cache slot ``write`` (int or 1-element tensor) gets the new keys/values, and
        attention reads the first ``keys`` slots."""
        n = tokens.shape[0]
        cache = self.cache[:, :, :n]
        valid = self.key_valid[:n]
        if isinstance(write, int):
            valid[:, write] = True
        else:
            valid.index_fill_(1, write, True)
        key_mask = valid[:, None, None, :keys]

        def attend(layer, q, k, v):
            if isinstance(write, int):
                cache[layer, 0, :, :, write] = k[:, :, 0]
                cache[layer, 1, :, :, write] = v[:, :, 0]
            else:
                cache[layer, 0].index_copy_(2, write, k)
                cache[layer, 1].index_copy_(2, write, v)
            return self._attention(q, cache[layer, 0, :, :, :keys], cache[layer, 1, :, :, :keys], key_mask)

        x = self._forward(tokens[:, None], positions[:, None], attend)
        return self._logits(x[:, 0])

    def _forward(self, ids, positions, attend) -> torch.Tensor:
        """The decoder stack over ids [n, s]; ``attend(layer, q, k, v)`` stores k/v and returns attention."""
        w = self.weights
        n, s = ids.shape
        h, hk, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [n, s, 1, hd]
        clip = self.config.clip_qkv
        x = F.embedding(ids, w.embed)
        for i in range(self.config.num_hidden_layers):
            qkv = F.linear(_layer_norm(x), w.qkv[i], None if w.qkv_bias is None else w.qkv_bias[i])
            if clip is not None:
                qkv = qkv.clamp(-clip, clip)
            qkv = qkv.view(n, s, h + 2 * hk, hd)
            qk = qkv[:, :, : h + hk]
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)
            v = qkv[:, :, h + hk :].transpose(1, 2)
            a = attend(i, q, k, v).transpose(1, 2).reshape(n, s, h * hd)
            x = x + F.linear(a, w.o[i], None if w.o_bias is None else w.o_bias[i])
            gate, up = F.linear(_layer_norm(x), w.gate_up[i]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down[i])
        return x

    def _attention(self, q, k, v, mask) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_layer_norm(x), self.weights.lm_head).float()


# ---------------------------------------------------------------------------------------------- references


@torch.inference_mode()
def hf_generate(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    cache_implementation: str | None = None,
) -> RolloutBatch:
    """The ``transformers`` ``generate`` reference, same semantics and return type as the engine.

    ``top_k`` is passed explicitly (``generate`` would otherwise apply its default of 50). ``generate``
    takes no generator, so one seeds the global RNG inside a forked RNG state.
    """
    device = model.lm_head.weight.device
    ids, mask = _left_pad(prompts, pad_id, device)
    sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
    kwargs = dict(
        attention_mask=mask.long(),
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        top_k=0 if params.greedy else params.top_k,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=True,
        cache_implementation=cache_implementation,
        **sampling,
    )
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(ids, **kwargs)
    response = out.sequences[:, ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()  # raw logits, temperature 1
    logprobs = logits.log_softmax(dim=-1).gather(2, response[:, :, None])[:, :, 0]
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
    model_path: str,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    seed: int = 0,
) -> RolloutBatch:
    """Optional vLLM backend for a checkpoint saved with ``save_pretrained`` (needs ``pip install vllm``).

    Same return type; vLLM's logprobs are at temperature 1 (its default ``logprobs_mode`` is raw). Raises
    ImportError when vLLM is missing.
    """
    import vllm

    llm = vllm.LLM(model=model_path, seed=seed)
    sampling = vllm.SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        stop_token_ids=[eos_id],
        logprobs=0,
        seed=seed,
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling)
    ids, mask = _left_pad(prompts, pad_id, "cpu")
    width = max(len(o.outputs[0].token_ids) for o in outputs)
    response = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(prompts), width)
    for i, o in enumerate(outputs):
        tokens = list(o.outputs[0].token_ids)
        response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logprobs[i, : len(tokens)] = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens)])
    lengths = torch.tensor([len(o.outputs[0].token_ids) for o in outputs])
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=torch.arange(width) < lengths[:, None],
        logprobs=logprobs,
        truncated=torch.tensor([o.outputs[0].finish_reason == "length" for o in outputs]),
    )
