"""The rollout engine: fast batched sampling from an OLMo causal LM with our own forward, KV cache and decode loop.

``RolloutEngine`` copies the weights of a ``transformers`` ``OlmoForCausalLM`` (q/k/v and gate/up fused)
and runs its own forward pass: a prefill of the left-padded prompts, then one token per step over a
preallocated KV cache (``_BlockedCache`` on CPU, ``_RowCache`` on CUDA). Position ids start at 0
at each prompt's first real token, exactly as ``generate`` derives them from the attention mask, so in
fp32 greedy decoding equals ``hf_generate`` token for token. Rows stop independently at EOS (finished
rows emit pad); once at most half of the rows still run, the cache is compacted to the running rows.

The loop runs in inference mode (the returned tensors are cloned out of it, so trainers can use them) and,
in eager mode, writes the cache with plain slices. On CUDA the engine runs in bf16 by default;
``compile=True`` captures the decode step as CUDA graphs, one per (rows, attended blocks), with sampling
left eager. On CPU ``compile=True`` runs the same fixed-buffer step without capture, so that path is
tested everywhere; the CPU default stays fp32 and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from echochamber.rollout.sampling import RolloutBatch, SamplingParams, sample_tokens
from echochamber.tensors import left_pad, position_ids, token_logprobs

_LN_EPS = 1e-5  # OlmoLayerNorm's fixed epsilon
_BLOCK = 32  # KV-cache positions per block; attention reads whole blocks
_CUDA_CHECK_EVERY = 8  # on CUDA, read the finished flags (a host sync) every this many steps


# ---------------------------------------------------------------------------------------------- helpers


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


def _rope_tables(config, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sign-folded sin [length, head_dim], so that rope(x) = x * cos + x.roll(half) * sin."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RolloutEngine supports only default RoPE, not {rope['rope_type']!r}")
    dim = _head_dim(config)
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    freqs = torch.arange(length, device=device)[:, None].float() * inv_freq  # as OlmoRotaryEmbedding
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[:, : dim // 2].neg_()
    return emb.cos(), sin


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_linear(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + a @ weight.T (+ bias): the residual add fused into the matmul."""
    return torch.addmm(x, a, weight.t()) if bias is None else x + F.linear(a, weight, bias)


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


class _BlockedCache:
    """KV cache ``[layers, 2, blocks, rows, kv_heads, _BLOCK, head_dim]`` (the CPU default): attention over
    the filled blocks reads one contiguous region (on CPU a strided ``[rows, heads, :t]`` slice of a longer
    buffer reads 3x slower), as batched matmuls with an additive fp32 bias ``[blocks, rows, _BLOCK]``."""

    def __init__(self, layers: int, rows: int, blocks: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        shape = (layers, 2, blocks, rows, kv_heads, _BLOCK, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)  # masked slots must be finite
        self.bias = torch.full((blocks, rows, _BLOCK), -math.inf, device=device)
        self.rows, self.blocks = rows, blocks

    def set_prompts(self, mask: torch.Tensor) -> None:
        """Rows ``:b`` see exactly their prompts' real tokens."""
        b, p = mask.shape
        self.bias[:, :b] = -math.inf
        self.bias[: _blocks(p), :b] = _to_blocks(torch.where(mask, 0.0, -math.inf), _blocks(p), -math.inf)

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The prompts' keys and values [b, p, kv_heads, head_dim]."""
        b, blocks = k.shape[0], _blocks(k.shape[1])
        self.kv[layer, 0, :blocks, :b] = _to_blocks(k, blocks, 0.0).transpose(2, 3)
        self.kv[layer, 1, :blocks, :b] = _to_blocks(v, blocks, 0.0).transpose(2, 3)

    def locate(self, n: int, write: int | torch.Tensor):
        """Make position ``write`` visible to rows ``:n``; return where ``store`` writes it. ``write`` is an
        int (eager: plain slices) or a 0-dim tensor (graph path: index ops, since replays change it)."""
        if isinstance(write, int):
            block, offset = divmod(write, _BLOCK)
            self.bias[block, :n, offset] = 0.0
            return block, offset
        # flat index of (block, row, [kv head,] offset) in the bias and in one layer's keys
        slot = write // _BLOCK * self.rows + torch.arange(n, device=self.bias.device)
        self.bias.view(-1).index_fill_(0, slot * _BLOCK + write % _BLOCK, 0.0)
        heads = torch.arange(self.kv_heads, device=self.bias.device)
        return ((slot[:, None] * self.kv_heads + heads) * _BLOCK + write % _BLOCK).view(-1)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, at) -> None:
        """One new position's keys and values [n, 1, kv_heads, head_dim] at ``locate``'s place."""
        n = k.shape[0]
        for cache, x in zip(self.kv[layer], (k, v)):
            if isinstance(at, tuple):
                cache[at[0], :n, :, at[1]] = x.reshape(n, self.kv_heads, self.head_dim)
            else:
                cache.view(-1, self.head_dim).index_copy_(0, at, x.reshape(-1, self.head_dim))

    def attend(self, layer: int, q: torch.Tensor, n: int, blocks: int) -> torch.Tensor:
        """Attention of one query per row [n, 1, heads, head_dim] over the first ``blocks`` blocks."""
        keys, values = self.kv[layer, 0, :blocks, :n], self.kv[layer, 1, :blocks, :n]
        bias = self.bias[:blocks, :n, None, None, :]  # [blocks, n, 1, 1, _BLOCK]
        q = q.view(n, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # grouped by kv head
        scores = torch.add(bias, torch.matmul(q, keys.transpose(-1, -2)).float(), alpha=self.head_dim**-0.5)
        weights = (scores - scores.amax(dim=(0, 4), keepdim=True)).exp_()  # softmax over blocks x offsets
        out = torch.matmul(weights.to(values.dtype), values).float().sum(dim=0)
        out = out / weights.sum(dim=(0, 4))[..., None]
        return out.to(q.dtype).view(n, 1, self.heads, self.head_dim)

    def compact(self, keep: torch.Tensor, blocks: int) -> None:
        """Move rows ``keep`` to the front (their first ``blocks`` blocks)."""
        self.kv[:, :, :blocks, : keep.shape[0]] = self.kv[:, :, :blocks, keep]
        self.bias[:blocks, : keep.shape[0]] = self.bias[:blocks, keep]


class _RowCache:
    """KV cache ``[layers, 2, rows, kv_heads, blocks * _BLOCK, head_dim]`` (the CUDA default): each row and
    head holds its positions in one contiguous run, so attention over the filled prefix is a strided slice
    that ``scaled_dot_product_attention`` reads in one fused kernel, masked by ``visible`` [rows, positions]."""

    def __init__(self, layers: int, rows: int, blocks: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        shape = (layers, 2, rows, kv_heads, blocks * _BLOCK, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)  # masked slots must be finite
        self.visible = torch.zeros(rows, blocks * _BLOCK, dtype=torch.bool, device=device)
        self.rows, self.blocks = rows, blocks

    def set_prompts(self, mask: torch.Tensor) -> None:
        b, p = mask.shape
        self.visible[:b] = False
        self.visible[:b, :p] = mask

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, p = k.shape[:2]
        self.kv[layer, 0, :b, :, :p] = k.transpose(1, 2)
        self.kv[layer, 1, :b, :, :p] = v.transpose(1, 2)

    def locate(self, n: int, write: int | torch.Tensor):
        if isinstance(write, int):
            self.visible[:n, write] = True
            return write
        at = write.view(1)
        self.visible[:n].index_fill_(1, at, True)
        return at

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, at) -> None:
        n = k.shape[0]
        for cache, x in zip(self.kv[layer], (k, v)):
            x = x.reshape(n, self.kv_heads, 1, self.head_dim)
            if isinstance(at, int):
                cache[:n, :, at : at + 1] = x
            else:
                cache[:n].index_copy_(2, at, x)

    def attend(self, layer: int, q: torch.Tensor, n: int, blocks: int) -> torch.Tensor:
        t = blocks * _BLOCK
        keys, values = self.kv[layer, 0, :n, :, :t], self.kv[layer, 1, :n, :, :t]
        # the query heads that share a kv head are its "query positions": one kernel, no repeated keys
        q = q.view(n, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.visible[:n, None, None, :t])
        return out.reshape(n, 1, self.heads, self.head_dim)

    def compact(self, keep: torch.Tensor, blocks: int) -> None:
        t = blocks * _BLOCK
        self.kv[:, :, : keep.shape[0], :, :t] = self.kv[:, :, keep, :, :t]
        self.visible[: keep.shape[0]] = self.visible[keep]


KV_LAYOUTS = {"blocks": _BlockedCache, "rows": _RowCache}


class _StepRunner:
    """Runs the decode step on fixed input buffers: on CUDA one captured graph per (rows, blocks).

    The graphs share the static inputs (the first ``n`` rows of each buffer) and one memory pool. On
    CPU the same buffers feed a plain call, so this plumbing is tested without a GPU.
    """

    def __init__(self, engine: RolloutEngine, rows: int):
        dev = engine.device
        self.engine = engine
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.write = torch.zeros((), dtype=torch.long, device=dev)
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}

    def __call__(self, tokens, positions, write: int, blocks: int) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.write.fill_(write)
        if (n, blocks) not in self.steps:
            self.steps[(n, blocks)] = self._build(n, blocks)
        return self.steps[(n, blocks)]()

    def _build(self, n: int, blocks: int) -> Callable[[], torch.Tensor]:
        def step():
            return self.engine._step(self.tokens[:n], self.positions[:n], self.write, blocks)

        if self.pool is None:
            return step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph, as capture requires
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()

        def replay():
            graph.replay()
            return logits

        return replay


class RolloutEngine:
    """Batched sampling from an ``OlmoForCausalLM`` with our own forward and preallocated KV cache.

    ``kv_layout`` picks the KV cache: ``"blocks"`` (``_BlockedCache``, the CPU default) or ``"rows"``
    (``_RowCache``, the CUDA default); both attend over whole blocks of ``_BLOCK`` positions and give the
    same tokens. ``max_len`` caps prompt + response length (default: whatever each call needs). ``compile``
    runs the decode step on fixed buffers, captured as CUDA graphs on CUDA. ``dtype`` defaults to bf16 on
    CUDA and the model's dtype elsewhere.
    Call ``refresh`` after the optimizer has changed the model.
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
        kv_layout: str | None = None,
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
        kv_layout = kv_layout or ("rows" if self.device.type == "cuda" else "blocks")
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {sorted(KV_LAYOUTS)}, not {kv_layout!r}")
        self.cache_type = KV_LAYOUTS[kv_layout]
        self.weights = _Weights(model, self.dtype)
        self.cache: _BlockedCache | _RowCache | None = None
        self.runner: _StepRunner | None = None

    def refresh(self) -> None:
        """Copy the model's current weights into the engine (in place, so CUDA graphs stay valid)."""
        self.weights.load(self.model)

    @torch.no_grad()  # not inference_mode: trainers use the outputs in autograd graphs
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
        with torch.inference_mode():  # less dispatch work per op; the outputs are cloned out of it
            batch = _concat([self._generate(chunk, params, generator) for chunk in chunks], self.pad_id)
        return RolloutBatch(**{k: v.clone() for k, v in vars(batch).items()})

    # ------------------------------------------------------------------------------------ decode loop

    def _generate(self, prompts, params: SamplingParams, generator) -> RolloutBatch:
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        b, p = ids.shape
        t_max = params.max_new_tokens
        self._reserve(b, p + t_max)
        lengths = mask.sum(dim=1)
        # one spare output row (index b) takes the writes of padding slots after a compaction
        out_ids = torch.full((b + 1, t_max), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros(b + 1, t_max, dtype=torch.float, device=self.device)
        n_out = torch.zeros(b + 1, dtype=torch.long, device=self.device)
        done = torch.zeros(b + 1, dtype=torch.bool, device=self.device)
        done[b] = True

        rows = torch.arange(b, device=self.device)  # output row of each cache slot
        logits = self._prefill(ids, mask)
        check_every = _CUDA_CHECK_EVERY if self.device.type == "cuda" else 1
        for t in range(t_max):
            tokens = sample_tokens(logits, params, generator)
            live = ~done[rows]
            tokens = torch.where(live, tokens, self.pad_id)
            out_ids[rows, t] = tokens
            out_lp[rows, t] = torch.where(live, token_logprobs(logits, tokens), 0.0)
            n_out[rows] += live
            done[rows] |= tokens == self.eos_id
            if t == t_max - 1:
                break
            if (t + 1) % check_every == 0:
                n_live = int((~done[rows]).sum())
                if n_live == 0:
                    break
                if n_live <= rows.shape[0] // 2:
                    rows, tokens = self._compact(rows, done, tokens, n_live, _blocks(p + t + 1))
            logits = self._decode(tokens, lengths[rows.clamp(max=b - 1)] + t, p + t)

        t_used = int(n_out.max())
        return RolloutBatch(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=out_ids[:b, :t_used],
            response_mask=torch.arange(t_used, device=self.device) < n_out[:b, None],
            logprobs=out_lp[:b, :t_used],
            truncated=~done[:b],
        )

    def _compact(self, rows, done, tokens, n_live: int, blocks: int):
        """Move the running rows to the front of the cache; with graphs, pad to a power of two rows."""
        keep = (~done[rows]).nonzero()[:, 0]
        n = 1 << (n_live - 1).bit_length() if self.runner is not None else n_live
        spare = done.shape[0] - 1
        new_rows = torch.full((n,), spare, dtype=torch.long, device=self.device)
        new_rows[:n_live] = rows[keep]
        new_tokens = torch.full((n,), self.pad_id, dtype=torch.long, device=self.device)
        new_tokens[:n_live] = tokens[keep]
        self.cache.compact(keep, blocks)
        return new_rows, new_tokens

    def _reserve(self, rows: int, length: int) -> None:
        """Make sure the cache holds ``rows`` sequences of ``length`` tokens."""
        if self.max_len is not None and length > self.max_len:
            raise ValueError(f"prompt + max_new_tokens = {length} exceeds the engine's max_len {self.max_len}")
        blocks = _blocks(max(length, self.max_len or 0))
        if self.cache is not None:
            if self.cache.rows >= rows and self.cache.blocks >= blocks:
                return
            rows, blocks = max(rows, self.cache.rows), max(blocks, self.cache.blocks)
        self.cache = self.runner = None  # free the old buffers first
        self.cache = self.cache_type(self.config.num_hidden_layers, rows, blocks, self.heads, self.kv_heads,
                                     self.head_dim, self.dtype, self.device)
        self.cos, self.sin = _rope_tables(self.config, blocks * _BLOCK, self.device)
        self.runner = _StepRunner(self, rows) if self.compile else None

    # ------------------------------------------------------------------------------------ forward

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts, fill the cache, return fp32 logits at the last position [b, vocab]."""
        b, p = ids.shape
        positions = position_ids(mask)
        self.cache.set_prompts(mask)
        causal = torch.ones(p, p, dtype=torch.bool, device=self.device).tril()
        # a padding query sees only itself, so no row of the softmax is empty
        attn_mask = ((causal & mask[:, None, :]) | torch.eye(p, dtype=torch.bool, device=self.device))[:, None]

        def attend(layer, q, k, v):  # [b, p, heads, head_dim]
            self.cache.fill(layer, k, v)
            groups = self.heads // self.kv_heads
            k, v = (x.repeat_interleave(groups, dim=2) if groups > 1 else x for x in (k, v))
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)

        x = self._forward(ids, positions, attend)
        return self._logits(x.view(b, p, -1)[:, -1])

    def _decode(self, tokens, positions, write: int) -> torch.Tensor:
        blocks = _blocks(write + 1)
        if self.runner is not None:
            return self.runner(tokens, positions, write, blocks)
        return self._step(tokens, positions, write, blocks)

    def _step(self, tokens, positions, write: int | torch.Tensor, blocks: int) -> torch.Tensor:
        """One decode step: cache position ``write`` gets the new keys and values, and attention reads the
        first ``blocks`` blocks. ``write`` is an int, or a 0-dim tensor on the graph path (replays change it)."""
        n = tokens.shape[0]
        at = self.cache.locate(n, write)

        def attend(layer, q, k, v):  # [n, 1, heads, head_dim]
            self.cache.store(layer, k, v, at)
            return self.cache.attend(layer, q, n, blocks)

        return self._logits(self._forward(tokens[:, None], positions[:, None], attend))

    def _forward(self, ids, positions, attend) -> torch.Tensor:
        """The decoder stack over ids [n, s] -> hidden states [n * s, d]. ``attend(layer, q, k, v)`` (each
        [n, s, heads, head_dim]) stores k/v and returns the attention output [n, s, heads, head_dim]."""
        w = self.weights
        n, s = ids.shape
        h, hk, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [n, s, 1, hd]
        clip = self.config.clip_qkv
        x = F.embedding(ids.view(-1), w.embed)
        for i in range(self.config.num_hidden_layers):
            qkv = F.linear(_layer_norm(x), w.qkv[i], None if w.qkv_bias is None else w.qkv_bias[i])
            if clip is not None:
                qkv = qkv.clamp(-clip, clip)
            qkv = qkv.view(n, s, h + 2 * hk, hd)
            qk = qkv[:, :, : h + hk]
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin).to(x.dtype)  # RoPE (fp32) on q and k
            a = attend(i, qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + hk :]).reshape(n * s, h * hd)
            x = _add_linear(x, a, w.o[i], None if w.o_bias is None else w.o_bias[i])
            gate, up = F.linear(_layer_norm(x), w.gate_up[i]).chunk(2, dim=-1)
            x = _add_linear(x, F.silu(gate) * up, w.down[i], None)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_layer_norm(x), self.weights.lm_head).float()


def _blocks(length: int) -> int:
    return -(-length // _BLOCK)


def _to_blocks(x: torch.Tensor, blocks: int, fill: float) -> torch.Tensor:
    """[n, p, ...] -> [blocks, n, _BLOCK, ...], positions from p on set to ``fill``."""
    n, p = x.shape[:2]
    pad = (0, 0) * (x.dim() - 2) + (0, blocks * _BLOCK - p)
    return F.pad(x, pad, value=fill).view(n, blocks, _BLOCK, *x.shape[2:]).transpose(0, 1)
