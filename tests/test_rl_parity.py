"""RL computes what the paper's implementation (OpenRLHF 0.6.3) computed: each formula of echochamber.rl
against a small hand-written reference of that implementation, on seeded tensors with right padding
(garbage in the padding), for every loss reduction. The references loop over sequences and micro-batches
the plain way, so they share no code with the vectorised library."""

import math
from types import SimpleNamespace

import pytest
import torch

from echochamber.rl import core, grpo, ppo, settings
from test_rl import ScriptedEngine, make_trainer, prompts_of, spec, world  # noqa: F401 - the tiny model fixture

EPS, VCLIP = 0.2, 0.2


def padded_batch(seed: int, n: int = 8, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    garbage = lambda t: torch.where(mask, t, torch.full_like(t, 1e4))      # noqa: E731
    old = torch.randn(n, width, generator=g) - 1.0
    logp = old + 0.3 * torch.randn(n, width, generator=g)
    adv = torch.randn(n, width, generator=g)
    values, old_values = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    returns = torch.randn(n, width, generator=g)
    return mask, {k: garbage(v) for k, v in dict(logp=logp, old=old, adv=adv, values=values,
                                                  old_values=old_values, returns=returns).items()}


# --- the reference: per sequence, per micro-batch, as OpenRLHF 0.6.3 reduces --------------------------

def ref_policy_terms(logp, old, adv):
    ratio = math.exp(logp - old)
    return -min(ratio * adv, min(max(ratio, 1 - EPS), 1 + EPS) * adv)


def ref_value_terms(v, old_v, ret):
    v_clip = old_v + min(max(v - old_v, -VCLIP), VCLIP)
    return 0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2)


def ref_reduce(term, t, mask, how, micro):
    """``term(row, col)`` reduced over a minibatch split into ``micro`` consecutive micro-batches."""
    rows = range(mask.shape[0])
    tokens = lambda rs: [(i, j) for i in rs for j in range(mask.shape[1]) if mask[i, j]]   # noqa: E731
    if how == "microbatch_token_mean":       # packed: token mean per micro-batch, mean over micro-batches
        chunks = [list(rows)[k:k + micro] for k in range(0, len(rows), micro)]
        return sum(sum(term(i, j) for i, j in tokens(c)) / len(tokens(c)) for c in chunks) / len(chunks)
    if how == "seq_mean":                    # unpacked: token mean per sequence, mean over sequences
        return sum(sum(term(i, j) for i, j in tokens([i])) / len(tokens([i])) for i in rows) / len(rows)
    return sum(term(i, j) for i, j in tokens(rows)) / len(tokens(rows))


def ours(fn, mask, tensors, how, micro, *names, **kw):
    """The library's loss summed over the same micro-batches, each normalised by the minibatch totals."""
    n = mask.shape[0]
    chunks = [slice(k, k + micro) for k in range(0, n, micro)]
    counts = dict(n_seqs=n, n_tokens=int(mask.sum()), n_micro=len(chunks))
    total = 0.0
    for c in chunks:
        out = fn(*(tensors[k][c] for k in names), mask[c], **kw, how=how, **counts)
        total += float(out[0] if isinstance(out, tuple) else out)
    return total


@pytest.mark.parametrize("how", core.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_and_value_losses_match_the_reference(how, seed):
    mask, t = padded_batch(seed)
    for micro in (2, 4, 8):
        pol = ours(core.clipped_policy_loss, mask, t, how, micro, "logp", "old", "adv", clip_eps=EPS)
        ref = ref_reduce(lambda i, j: ref_policy_terms(float(t["logp"][i, j]), float(t["old"][i, j]),
                                                       float(t["adv"][i, j])), t, mask, how, micro)
        assert pol == pytest.approx(ref, rel=1e-5, abs=1e-6), (how, micro)
        val = ours(core.clipped_value_loss, mask, t, how, micro, "values", "old_values", "returns", clip=VCLIP)
        ref = ref_reduce(lambda i, j: ref_value_terms(float(t["values"][i, j]), float(t["old_values"][i, j]),
                                                      float(t["returns"][i, j])), t, mask, how, micro)
        assert val == pytest.approx(ref, rel=1e-5, abs=1e-6), (how, micro)


def test_the_reductions_differ_where_lengths_differ():
    # the packed reduction weighs a micro-batch's long sequences more than seq_mean does
    mask, t = padded_batch(0)
    got = {how: ours(core.clipped_policy_loss, mask, t, how, 4, "logp", "old", "adv", clip_eps=EPS)
           for how in core.LOSS_AGGREGATIONS}
    assert len({round(v, 6) for v in got.values()}) == 3


def test_kl_estimators_match_their_formulas():
    mask, t = padded_batch(3)
    k1 = core.kl_estimate(t["logp"], t["old"], "k1", mask)
    k3 = core.kl_estimate(t["logp"], t["old"], "k3", mask)
    for i, j in mask.nonzero().tolist():
        log_ratio = float(t["logp"][i, j] - t["old"][i, j])        # log p - log q
        assert float(k1[i, j]) == pytest.approx(log_ratio, abs=1e-6)
        # k3 = q/p - 1 - log(q/p)
        assert float(k3[i, j]) == pytest.approx(math.exp(-log_ratio) - 1 + log_ratio, rel=1e-4, abs=1e-6)
    assert (k1[~mask] == 0).all() and (k3[~mask] == 0).all()


def ref_kl(kind: str, logp: float, ref: float) -> float:
    """Schulman's estimators of KL(policy || reference) for one token sampled from the policy."""
    d = logp - ref                                                  # log p - log q
    return {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[kind]


@pytest.mark.parametrize("how", core.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_grpos_kl_loss_term_matches_the_formula_for_each_estimator_and_reduction(kind, how):
    # GRPO's own loss term (GRPOTrainer.extra_loss), summed over micro-batches like the trainer, against the
    # estimator written out per token and reduced by the reference; a coefficient far from 0 and 1
    mask, t = padded_batch(6)
    coef = 0.37
    s = settings.Settings.from_spec(spec(algo="grpo", kl_coef=coef, loss_agg=how, grpo=dict(kl_estimator=kind)))
    trainer = SimpleNamespace(s=s)
    n = mask.shape[0]
    for micro in (2, 4, 8):
        chunks = [slice(k, k + micro) for k in range(0, n, micro)]
        counts = dict(n_seqs=n, n_tokens=int(mask.sum()), n_micro=len(chunks))
        got = sum(float(grpo.GRPOTrainer.extra_loss(
            trainer, SimpleNamespace(ref_logprobs=t["old"][c], response_mask=mask[c]), t["logp"][c], counts))
            for c in chunks)
        want = coef * ref_reduce(lambda i, j: ref_kl(kind, float(t["logp"][i, j]), float(t["old"][i, j])),
                                 t, mask, how, micro)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (kind, how, micro)
        assert abs(want) > 1e-3                                     # the term is there to be checked


def test_whitening_uses_the_population_variance():
    mask, t = padded_batch(4)
    xs = [float(t["adv"][i, j]) for i, j in mask.nonzero().tolist()]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)               # divided by n, not n - 1
    w = core.whiten(t["adv"], mask)
    for (i, j), x in zip(mask.nonzero().tolist(), xs):
        assert float(w[i, j]) == pytest.approx((x - mean) / math.sqrt(max(var, 1e-8)), rel=1e-5)
    assert (w[~mask] == 0).all()


def test_log_probs_and_entropy_are_taken_at_the_sampling_temperature():
    g = torch.Generator().manual_seed(5)
    logits, tokens = torch.randn(3, 4, 11, generator=g), torch.randint(0, 11, (3, 4), generator=g)
    for temperature in (1.0, 0.7):
        lp = core.token_logprobs(logits, tokens, temperature)
        ent = core.token_entropy(logits, temperature)
        for i in range(3):
            for j in range(4):
                z = [float(v) / temperature for v in logits[i, j]]
                lse = math.log(sum(math.exp(v) for v in z))
                assert float(lp[i, j]) == pytest.approx(z[int(tokens[i, j])] - lse, abs=1e-5)
                p = [math.exp(v - lse) for v in z]
                assert float(ent[i, j]) == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)


def test_the_trainer_scores_policy_and_reference_at_the_sampling_temperature(world):  # noqa: F811
    tr = make_trainer(world, algo="ppo", kl_coef=0.01, temperature=0.7)
    prompts, golds = prompts_of(world)
    exp, _, info = tr.rollout(prompts, golds)
    with torch.no_grad():
        logits = core.policy_logits(tr.policy, exp)
        ref_logits = core.policy_logits(tr.ref, exp)
    m = exp.response_mask
    want = (logits / 0.7).log_softmax(-1).gather(-1, exp.response_ids[..., None])[..., 0]
    want_ref = (ref_logits / 0.7).log_softmax(-1).gather(-1, exp.response_ids[..., None])[..., 0]
    torch.testing.assert_close(exp.old_logprobs[m], want[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.ref_logprobs[m], want_ref[m], atol=1e-5, rtol=0)
    # the rollout engine reports temperature-1 log-probs; the check against them compares like with like
    assert info["logprob_gap_sum"] / int(m.sum()) < 1e-4


def test_the_value_head_is_a_bias_free_linear_layer(world):  # noqa: F811
    tr = make_trainer(world, algo="ppo")
    head = tr.critic.head
    assert isinstance(head, torch.nn.Linear) and head.bias is None and head.out_features == 1
    assert isinstance(tr.critic, ppo.Critic)


def packed_reference_grads(tr, exp, chunks, temperature):
    """The paper's packed loss written out: per micro-batch the clipped surrogate's token mean, averaged over
    the micro-batches; returns the policy's gradient."""
    tr.policy.zero_grad(set_to_none=True)
    total = 0.0
    for rows in chunks:
        mb = exp.select(torch.tensor(rows))
        logits = core.policy_logits(tr.policy, mb) / temperature
        logp = logits.log_softmax(-1).gather(-1, mb.response_ids[..., None])[..., 0]
        m = mb.response_mask
        ratio = (logp - mb.old_logprobs)[m].exp()
        adv = mb.advantages[m]
        surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
        total = total + surrogate.mean() / len(chunks)
    total.backward()
    grads = [p.grad.clone() for p in tr.policy.parameters()]
    tr.policy.zero_grad(set_to_none=True)
    return grads


def reference_grads(params, policy, exp, idx, how: str, micro: int, temperature: float, coef: float = 0.0,
                    kind: str = "k3") -> list[torch.Tensor]:
    """The gradient of GRPO's minibatch loss written out per sequence: the clipped surrogate plus ``coef``
    times the KL estimator, each token's term reduced by ``how`` over the minibatch ``idx`` (packed:
    consecutive rows of ``idx`` in micro-batches of ``micro``). Shares no code with the library's losses."""
    rows = idx.tolist()
    n_tokens = int(exp.response_mask[idx].sum())
    groups = [rows[k:k + micro] for k in range(0, len(rows), micro)] if how == "microbatch_token_mean" else [rows]
    for p in params:
        p.grad = None
    total = 0.0
    for group in groups:
        mb = exp.select(torch.tensor(group))
        logits = core.policy_logits(policy, mb) / temperature
        logp = logits.log_softmax(-1).gather(-1, mb.response_ids[..., None])[..., 0]
        group_tokens = int(mb.response_mask.sum())
        for r in range(len(group)):
            m = mb.response_mask[r]
            lp = logp[r][m]
            ratio, adv = (lp - mb.old_logprobs[r][m]).exp(), mb.advantages[r][m]
            d = lp - mb.ref_logprobs[r][m]
            kl = {"k1": d, "k2": d.square() / 2, "k3": torch.exp(-d) - 1 + d}[kind]
            term = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv) + coef * kl
            if how == "seq_mean":
                total = total + term.mean() / len(rows)
            elif how == "token_mean":
                total = total + term.sum() / n_tokens
            else:
                total = total + term.sum() / group_tokens / len(groups)
    total.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def grpo_batch(world, **kw):  # noqa: F811
    """A GRPO trainer (learning rate 0: a step moves nothing) with a rollout of known text, random
    advantages, reference log-probs away from the policy's (so that every KL estimator has a gradient),
    and a shuffled minibatch of 8."""
    tr = make_trainer(world, algo="grpo", train_batch_size=8, micro_batch_size=2, temperature=0.7,
                      max_new_tokens=24, actor_lr=0.0, **kw)
    tr.engine = ScriptedEngine(world["tok"], ["7", "The answer is 12 apples in all.", "def f():\n    return 3\n",
                                              "no", "x = 4\nprint(x)\nso the total is 4", "It is 9."])
    prompts, golds = prompts_of(world)
    exp, _, _ = tr.rollout(prompts, golds)
    g = torch.Generator().manual_seed(0)
    mask = exp.response_mask
    exp.advantages = torch.randn(len(exp), 1, generator=g).expand_as(exp.response_ids).masked_fill(
        ~mask, 0.0).contiguous()
    exp.ref_logprobs = (exp.old_logprobs + 0.5 * torch.randn(exp.old_logprobs.shape, generator=g)).masked_fill(
        ~mask, 0.0)
    idx = torch.randperm(len(exp), generator=g)[:8]
    return tr, exp, idx


@pytest.mark.parametrize("how", core.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_the_grpo_trainers_gradient_includes_the_kl_term_as_written_out(world, kind, how):  # noqa: F811
    coef = 0.3
    tr, exp, idx = grpo_batch(world, kl_coef=coef, loss_agg=how, grad_clip=1e9,    # no clipping: raw gradients
                              grpo=dict(kl_estimator=kind))
    params = list(tr.policy.parameters())
    want = reference_grads(params, tr.policy, exp, idx, how, 2, 0.7, coef, kind)
    without = reference_grads(params, tr.policy, exp, idx, how, 2, 0.7, 0.0, kind)
    assert max(float((w - o).abs().max()) for w, o in zip(want, without)) > 1e-3   # the KL term moves it
    tr.opt.zero_grad = lambda *a, **k: None            # keep the trainer's gradient for the comparison
    tr._minibatch_step(exp, idx)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-4)


def test_gradient_clipping_scales_the_policy_and_critic_gradients_down_to_the_clip(world):  # noqa: F811
    clip = 1e-3
    tr, exp, idx = grpo_batch(world, kl_coef=0.3, loss_agg="microbatch_token_mean", grad_clip=clip)
    params = list(tr.policy.parameters())
    raw = reference_grads(params, tr.policy, exp, idx, "microbatch_token_mean", 2, 0.7, 0.3, "k3")
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw])))
    assert norm > 10 * clip                                          # clipping has work to do
    tr.opt.zero_grad = lambda *a, **k: None
    out = tr._minibatch_step(exp, idx)
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-4)         # logged: the norm before clipping
    for p, g in zip(params, raw):                                    # used: the gradient scaled to the clip
        torch.testing.assert_close(p.grad, g * (clip / (norm + 1e-6)), atol=1e-9, rtol=1e-4)
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    assert clipped == pytest.approx(clip, rel=1e-4)

    # PPO's critic is clipped by the same setting
    tr = make_trainer(world, algo="ppo", train_batch_size=8, micro_batch_size=4, actor_lr=0.0, critic_lr=0.0,
                      grad_clip=clip)
    prompts, golds = prompts_of(world)
    exp, _, _ = tr.rollout(prompts, golds)
    exp, _ = tr.advantages(exp)
    exp.returns = exp.returns + 5.0 * exp.response_mask            # far from the values: a large critic gradient
    tr.critic_opt.zero_grad = lambda *a, **k: None
    out = tr._minibatch_step(exp, torch.arange(8))
    critic = [p.grad for p in tr.critic.parameters() if p.grad is not None]
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in critic])))
    assert out["critic_grad_norm"] > 10 * clip and clipped == pytest.approx(clip, rel=1e-4)


def test_packed_micro_batches_are_consecutive_rows_of_the_shuffled_minibatch(world):  # noqa: F811
    # OpenRLHF packs micro_train_batch_size samples in its shuffled buffer's order, and the packed reduction
    # depends on which rows share a micro-batch: the trainer's gradient must be that one, not the gradient of
    # the same rows regrouped by length (which weighs short sequences' tokens more)
    tr = make_trainer(world, algo="grpo", loss_agg="microbatch_token_mean", train_batch_size=8, micro_batch_size=2,
                      grad_clip=1e9, temperature=0.7, max_new_tokens=24, actor_lr=0.0)   # lr 0: the step moves nothing
    tr.engine = ScriptedEngine(world["tok"], ["7", "The answer is 12 apples in all.", "def f():\n    return 3\n",
                                              "no", "x = 4\nprint(x)\nso the total is 4", "It is 9."])
    prompts, golds = prompts_of(world)
    exp, _, _ = tr.rollout(prompts, golds)
    g = torch.Generator().manual_seed(0)
    exp.advantages = torch.randn(len(exp), 1, generator=g).expand_as(exp.response_ids).masked_fill(
        ~exp.response_mask, 0.0).contiguous()          # every row pulls, whatever its reward
    idx = torch.randperm(len(exp), generator=g)[:8]
    packed = [idx[i:i + 2].tolist() for i in range(0, 8, 2)]
    regrouped = [c.tolist() for c in core.micro_batches(exp, idx, 2)]     # sorted by length, then cut
    assert {frozenset(c) for c in packed} != {frozenset(c) for c in regrouped}   # the test can tell them apart
    want = packed_reference_grads(tr, exp, packed, 0.7)
    other = packed_reference_grads(tr, exp, regrouped, 0.7)
    assert max(float((w - o).abs().max()) for w, o in zip(want, other)) > 1e-4

    tr.opt.zero_grad = lambda *a, **k: None            # keep the trainer's gradient for the comparison
    tr._minibatch_step(exp, idx)
    for p, w in zip(tr.policy.parameters(), want):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-4)


def test_grpo_minibatches_shuffle_samples_one_by_one_as_openrlhfs_replay_buffer(world):  # noqa: F811
    # OpenRLHF splits a rollout into single samples and shuffles them: a prompt's group of samples is spread
    # over the optimizer steps, not kept in one minibatch
    tr = make_trainer(world, algo="grpo", samples_per_prompt=4, train_batch_size=4, micro_batch_size=4)
    prompts, golds = prompts_of(world, n=4)
    exp, _, _ = tr.rollout(prompts, golds)
    exp, _ = tr.advantages(exp)
    seen = []
    tr._minibatch_step = lambda e, idx: seen.append(idx.tolist()) or {}
    tr.update(exp)
    assert sorted(sum(seen, [])) == list(range(16)) and all(len(mb) == 4 for mb in seen)
    groups_per_minibatch = [len({row // 4 for row in mb}) for mb in seen]
    assert max(groups_per_minibatch) > 1            # a minibatch of 4 mixes prompts: groups are not kept whole
