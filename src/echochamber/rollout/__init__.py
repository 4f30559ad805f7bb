"""Fast batched sampling from an OLMo causal LM: our own forward, KV cache and decode loop.

Left-padded prompts in, one response per prompt out (a :class:`RolloutBatch`: token ids, masks,
log-probs at temperature 1, truncation flags), under temperature / top-k / top-p with exact semantics.

The package's modules:

- ``engine``: :class:`RolloutEngine`, which copies the model's weights (fused and stacked over layers)
  and runs the prefill and the decode loop over a preallocated block-contiguous KV cache, the decode
  step captured as CUDA graphs with ``compile=True``;
- ``sampling``: :class:`SamplingParams`, :class:`RolloutBatch` and the token draw (:func:`filter_logits`,
  :func:`sample_tokens`);
- ``reference``: the other backends, same semantics and return type: :func:`hf_generate`
  (``transformers`` ``generate``, the reference) and :func:`vllm_generate` (optional, when ``HAS_VLLM``).
"""

from echochamber.rollout.engine import RolloutEngine
from echochamber.rollout.reference import HAS_VLLM, hf_generate, vllm_generate
from echochamber.rollout.sampling import RolloutBatch, SamplingParams, filter_logits, sample_tokens

__all__ = ["HAS_VLLM", "RolloutBatch", "RolloutEngine", "SamplingParams", "filter_logits", "hf_generate",
           "sample_tokens", "vllm_generate"]
