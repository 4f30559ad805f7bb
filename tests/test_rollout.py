"""The rollout engine against transformers' generate and a full forward pass, on tiny random models."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import OlmoConfig, OlmoForCausalLM

from echochamber.rollout import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    filter_logits,
    hf_generate,
    sample_tokens,
    vllm_generate,
)

PAD = 0
NO_EOS = 10_000  # an id outside every test vocabulary: nothing stops early


def tiny_olmo(tied: bool, vocab: int = 256, seed: int = 0) -> OlmoForCausalLM:
    """Tied: plain multi-head attention. Untied: grouped-query attention and clipped q/k/v."""
    torch.manual_seed(seed)
    cfg = OlmoConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4 if tied else 2,
        clip_qkv=None if tied else 2.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        initializer_range=0.1,  # peaked distributions: no near-ties in greedy decoding
        pad_token_id=PAD,
        eos_token_id=None,
    )
    return OlmoForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request):
    return tiny_olmo(request.param)


def make_prompts(vocab: int, lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


PROMPTS = make_prompts(256, [5, 1, 17, 9, 3, 12])
GREEDY = SamplingParams(max_new_tokens=12, greedy=True)


def assert_same(a: RolloutBatch, b: RolloutBatch) -> None:
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def full_forward_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """log p(response token t) from one forward pass over prompt + response, HF positions from the mask."""
    ids, mask = batch.sequences()
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    p = batch.prompt_ids.shape[1]
    logprobs = logits[:, p - 1 : -1].log_softmax(dim=-1)
    return logprobs.gather(2, batch.response_ids[:, :, None])[:, :, 0].masked_fill(~batch.response_mask, 0.0)


BOTH_CACHES = pytest.mark.parametrize("layout", ["blocks", "rows"], ids=["blocked cache", "row cache"])


def frequent_token(batch: RolloutBatch) -> int:
    """The token most rows emit in their first half: as EOS it stops rows at different steps."""
    half = batch.response_ids[:, : batch.response_ids.shape[1] // 2]
    rows_with = torch.stack([(half == t).any(dim=1) for t in range(int(half.max()) + 1)]).sum(dim=1)
    return int(rows_with.argmax())


@BOTH_CACHES
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fixed-shape step"])
def test_greedy_equals_hf_generate(model, compile, layout):
    ref = hf_generate(model, PROMPTS, GREEDY, eos_id=NO_EOS, pad_id=PAD)
    ours = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD, compile=compile, kv_layout=layout).generate(PROMPTS, GREEDY)
    assert_same(ours, ref)
    assert ours.response_ids.shape == (len(PROMPTS), GREEDY.max_new_tokens)
    assert ours.truncated.all()


@BOTH_CACHES
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fixed-shape step"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_eos_stops_each_row(tied, compile, layout):
    """Rows stop at their own EOS; most stop early, so the cache is compacted on the way."""
    model = tiny_olmo(tied, vocab=24)
    params = SamplingParams(max_new_tokens=24, greedy=True)
    prompts = make_prompts(24, [4, 11, 7, 2, 15, 6, 9, 3, 5, 8], seed=2)
    eos = frequent_token(hf_generate(model, prompts, params, eos_id=NO_EOS, pad_id=PAD))
    ref = hf_generate(model, prompts, params, eos_id=eos, pad_id=PAD)
    ours = RolloutEngine(model, eos_id=eos, pad_id=PAD, compile=compile, kv_layout=layout).generate(prompts, params)
    assert_same(ours, ref)
    stopped = ~ours.truncated
    assert stopped.sum() > len(prompts) // 2
    for row, length in enumerate(ours.response_mask.sum(dim=1).tolist()):
        assert ours.response_mask[row, :length].all()
        assert (ours.response_ids[row, length:] == PAD).all() and (ours.logprobs[row, length:] == 0).all()
        assert (ours.response_ids[row, length - 1] == eos) == bool(stopped[row])
        assert not (ours.response_ids[row, : length - 1] == eos).any()


@BOTH_CACHES
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "fixed-shape step"])
def test_logprobs_match_full_forward(compile, layout):
    """Sampling with top-k/top-p; a small vocabulary makes EOS frequent, so rows stop and are compacted."""
    model = tiny_olmo(tied=False, vocab=24)
    prompts = make_prompts(24, [3, 8, 1, 5, 12, 4, 7, 2, 9, 6])
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=20)
    engine = RolloutEngine(model, eos_id=5, pad_id=PAD, compile=compile, kv_layout=layout)
    batch = engine.generate(prompts, params, generator=torch.Generator().manual_seed(3))
    assert (~batch.truncated).sum() > len(prompts) // 2
    torch.testing.assert_close(batch.logprobs, full_forward_logprobs(model, batch), atol=1e-4, rtol=0)


def test_truncated_flag_and_eos_at_the_last_step(model):
    free = hf_generate(model, PROMPTS, GREEDY, eos_id=NO_EOS, pad_id=PAD).response_ids
    # the latest first occurrence of a token in row 0; as EOS with that many new tokens, row 0 ends
    # with EOS exactly at the limit, which is not a truncation
    firsts = {}
    for j, token in enumerate(free[0].tolist()):
        firsts.setdefault(token, j)
    eos, last = max(firsts.items(), key=lambda item: item[1])
    params = SamplingParams(max_new_tokens=last + 1, greedy=True)
    batch = RolloutEngine(model, eos_id=eos, pad_id=PAD).generate(PROMPTS, params)
    assert batch.response_mask[0].all() and batch.response_ids[0, -1] == eos and not batch.truncated[0]
    assert torch.equal(batch.truncated, ~(free[:, : last + 1] == eos).any(dim=1))


def test_top_k_one_is_greedy(model):
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD)
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1))
    assert_same(sampled, engine.generate(PROMPTS, GREEDY))


def test_same_seed_same_samples(model):
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)

    def run(seed):
        return engine.generate(PROMPTS, params, generator=torch.Generator().manual_seed(seed)).response_ids

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_batches_of_rows_give_the_same_result(model):
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD)
    assert_same(engine.generate(PROMPTS, GREEDY, batch_size=4), engine.generate(PROMPTS, GREEDY))


def test_outputs_can_enter_a_training_graph(model):
    """The engine decodes in inference mode, but a trainer saves its outputs for backward."""
    batch = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD).generate(PROMPTS, SamplingParams(max_new_tokens=8))
    scale = torch.ones((), requires_grad=True)
    (scale * batch.logprobs).sum().backward()  # fails on inference tensors
    assert scale.grad == batch.logprobs.sum()


def test_refresh_sees_in_place_updates():
    model = tiny_olmo(tied=True)
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD)
    before = engine.generate(PROMPTS, GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an optimizer step: same tensors, new values
    assert_same(engine.generate(PROMPTS, GREEDY), before)  # still the old weights
    engine.refresh()
    after = engine.generate(PROMPTS, GREEDY)
    assert not torch.equal(after.response_ids, before.response_ids)
    assert_same(after, hf_generate(model, PROMPTS, GREEDY, eos_id=NO_EOS, pad_id=PAD))


def test_unknown_kv_layout_is_refused(model):
    with pytest.raises(ValueError, match="kv_layout"):
        RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD, kv_layout="paged")


def test_max_len_is_enforced(model):
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD, max_len=20)
    with pytest.raises(ValueError, match="max_len"):
        engine.generate(PROMPTS, GREEDY)  # 17-token prompt + 12 new tokens


# ---------------------------------------------------------------------------------------------- sampling


PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(1.0, {0, 1, 2, 3}), (0.97, {0, 1, 2, 3}), (0.9, {0, 1, 3}), (0.75, {1, 3}), (0.5, {1}), (0.01, {1})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    out = filter_logits(PROBS.log()[None], top_p=top_p)[0]
    assert set(torch.isfinite(out).nonzero()[:, 0].tolist()) == kept
    assert torch.equal(out[torch.isfinite(out)], PROBS.log()[torch.isfinite(out)])


@pytest.mark.parametrize("spread", [8.0, 12.0, 20.0])  # logits of a trained model: a few tokens hold the mass
def test_top_p_over_a_large_vocabulary_keeps_the_same_nucleus_as_a_full_sort(spread, monkeypatch):
    from echochamber.rollout import sampling

    peaked = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * spread
    peaked[3, [5, 9]] = peaked[3].max() + 1.0  # a tie at the top
    mixed = peaked.clone()
    mixed[::7] = 0.0  # every 7th row uniform: its nucleus is most of the vocabulary
    assert sampling._top_p_within(peaked, 0.95, 64) is not None  # the partial ranking decides these
    assert sampling._top_p_within(mixed, 0.95, 64) is None  # these need the full sort
    fast = [filter_logits(x, top_p=0.95) for x in (peaked, mixed)]
    monkeypatch.setattr(sampling, "_NUCLEUS_CANDIDATES", 1 << 20)  # never rank partially: always sort
    for x, out in zip((peaked, mixed), fast):
        full = filter_logits(x, top_p=0.95)
        assert torch.equal(torch.isfinite(out), torch.isfinite(full))
        assert torch.equal(out[torch.isfinite(out)], x[torch.isfinite(out)])


def test_top_k_then_top_p():
    assert set(torch.isfinite(filter_logits(PROBS.log()[None], top_k=2)[0]).nonzero()[:, 0].tolist()) == {1, 3}
    # top-p renormalises over the top-k survivors: 0.5 / 0.8 = 0.625 >= 0.6
    out = filter_logits(PROBS.log()[None], top_k=2, top_p=0.6)[0]
    assert set(torch.isfinite(out).nonzero()[:, 0].tolist()) == {1}


def test_sampler_draws_from_the_filtered_distribution():
    n = 40_000
    logits = PROBS.log().expand(n, -1)
    params = SamplingParams(top_p=0.9)
    counts = sample_tokens(logits, params, torch.Generator().manual_seed(0)).bincount(minlength=4).float()
    expected = torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95
    assert counts[2] == 0
    assert torch.allclose(counts / n, expected, atol=4 * math.sqrt(0.25 / n))


def test_temperature_sharpens():
    logits = PROBS.log().expand(40_000, -1)
    counts = sample_tokens(logits, SamplingParams(temperature=0.5), torch.Generator().manual_seed(0)).bincount()
    expected = PROBS**2 / (PROBS**2).sum()
    assert torch.allclose(counts / 40_000.0, expected, atol=0.01)


@BOTH_CACHES
def test_bf16_engine_tracks_the_bf16_model(layout):
    """The bf16 path (the CUDA default: row cache) with fixed buffers, on CPU: log-probs near a bf16 HF forward."""
    model = tiny_olmo(tied=False).to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=16, temperature=0.7)
    engine = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD, compile=True, dtype=torch.bfloat16, kv_layout=layout)
    batch = engine.generate(PROMPTS, params, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.logprobs, full_forward_logprobs(model, batch), atol=0.05, rtol=0)


def test_attention_biases():
    """OLMo has none, but the config allows them: q/k/v/o biases are read and applied."""
    torch.manual_seed(0)
    cfg = tiny_olmo(tied=False).config
    cfg.attention_bias = True
    model = OlmoForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ours = RolloutEngine(model, eos_id=NO_EOS, pad_id=PAD).generate(PROMPTS, GREEDY)
    assert_same(ours, hf_generate(model, PROMPTS, GREEDY, eos_id=NO_EOS, pad_id=PAD))


class FakeVllm:
    """A ``vllm`` module in the shape its ``LLM.generate`` documents, sampling greedily with an HF model:
    ``token_ids`` run up to and including a stop token, ``logprobs`` is one ``{token: Logprob}`` dict per
    step, ``finish_reason`` is ``"stop"`` or ``"length"``. It records the ``SamplingParams`` it was given."""

    def __init__(self, model):
        self.model, self.sampling = model, None
        outer = self

        class LLM:
            def generate(self, requests, sampling):
                outer.sampling = sampling
                return [outer.request(r["prompt_token_ids"], sampling) for r in requests]

        self.LLM, self.SamplingParams = LLM, lambda **kw: SimpleNamespace(**kw)

    def request(self, prompt, sampling):
        ids = list(prompt)
        tokens, steps = [], []
        with torch.no_grad():
            while len(tokens) < sampling.max_tokens:
                logprobs = self.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
                token = int(logprobs.argmax())
                tokens.append(token)
                steps.append({token: SimpleNamespace(logprob=float(logprobs[token]))})
                ids.append(token)
                if token in sampling.stop_token_ids:
                    break
        reason = "stop" if tokens[-1] in sampling.stop_token_ids else "length"
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=steps, finish_reason=reason)])


def test_vllm_adapter_returns_what_hf_generate_returns(monkeypatch):
    """vLLM is optional and needs a GPU; its adapter is checked against vLLM's documented output shape:
    rows stopped at EOS and rows cut at the limit give the reference's ids, masks, log-probs and flags."""
    model = tiny_olmo(tied=True, vocab=24)
    params = SamplingParams(max_new_tokens=24, greedy=True)
    prompts = make_prompts(24, [4, 11, 7, 2, 15, 6, 9, 3, 5, 8], seed=2)
    eos = frequent_token(hf_generate(model, prompts, params, eos_id=NO_EOS, pad_id=PAD))
    fake = FakeVllm(model)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    ours = vllm_generate(fake.LLM(), prompts, params, eos_id=eos, pad_id=PAD)
    ref = hf_generate(model, prompts, params, eos_id=eos, pad_id=PAD)
    assert_same(ours, ref)
    assert ours.truncated.any() and not ours.truncated.all()
    assert fake.sampling.temperature == 0.0 and fake.sampling.top_k == -1  # greedy; top-k off
    assert fake.sampling.stop_token_ids == [eos] and fake.sampling.logprobs == 0
