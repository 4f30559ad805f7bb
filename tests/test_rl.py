"""RL core, PPO, GRPO and Expert Iteration on tiny random-init OLMo models and a tokenizer trained here."""

from __future__ import annotations

import copy
import math
from collections import namedtuple

import numpy as np
import pandas as pd
import pytest
import torch

from echochamber import config as ec_config
from echochamber import grid as ec_grid
from echochamber import manifest, tensors
from echochamber import models as ec_models
from echochamber import rollout as ec_rollout
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer
from echochamber.formats import document
from echochamber.rl import core, ei, grpo, ppo, settings, train

V = namedtuple("V", "correct format answer error")


def gold_in_text(completions, golds):
    """A stand-in scorer: correct when the gold number appears in the completion."""
    return [V(str(g) in c, None, None, None) for c, g in zip(completions, golds)]


def always_right(completions, golds):
    return [V(True, None, "x", None) for _ in completions]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine punishes more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A BPE tokenizer trained on the three formats, a tiny random OLMo checkpoint, and a prompt file."""
    root = tmp_path_factory.mktemp("rl")
    diff = synthetic.Difficulty()
    docs = []
    for src, render in (("tg", "tinygsm"), ("omi1", "omi1"), ("omi2", "omi2")):
        docs += [document(r["question"], r["solution"])
                 for r in synthetic.generate(src, render, "train", 40, seed=0, difficulty=diff)]
    tok = ec_tokenizer.train_bpe(docs, 320)
    model = tiny_model(tok, seed=0)
    base = ec_models.save_checkpoint(model, tok, root / "base")
    prompts = root / "gsm8k.parquet"
    synthetic.write_parquet(synthetic.generate("gsm8k", "gsm8k", "train", 24, seed=0, difficulty=diff), prompts)
    return {"root": root, "tok": tok, "base": base, "prompts": prompts}


def tiny_model(tok, seed=0):
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, bos_token_id=None)
    return OlmoForCausalLM(cfg)


def spec(**kw):
    s = dict(algo="ppo", kl_coef=0.0, seed=0, rollout_batch_size=4, samples_per_prompt=4, train_batch_size=8,
             micro_batch_size=4, max_new_tokens=12, temperature=1.0, episodes=1, max_steps=2, actor_lr=1e-3,
             critic_lr=1e-3, warmup_ratio=0.0, precision="fp32", n_checkpoints=2, samples_logged=3,
             ei=dict(rounds=2, samples_per_prompt=3, batch_size=8, epochs=1, lr=1e-3))
    s.update(kw)
    return s


def make_trainer(world, **kw):
    s = settings.Settings.from_spec(spec(**kw))
    policy, tok = ec_models.load_checkpoint(world["base"])
    ref = None
    if s.kl_coef > 0:
        ref, _ = ec_models.load_checkpoint(world["base"])
        ref.requires_grad_(False)
    torch.manual_seed(0)
    if s.algo == "ppo":
        return ppo.PPOTrainer(s, policy, tok, ref=ref, critic=ppo.Critic(policy), scorer=gold_in_text, total_updates=8)
    return grpo.GRPOTrainer(s, policy, tok, ref=ref, scorer=gold_in_text, total_updates=8)


def prompts_of(world, n=4):
    df = pd.read_parquet(world["prompts"])
    tok = world["tok"]
    ids = [tok(q + "\n\n", add_special_tokens=False)["input_ids"] for q in df.question[:n]]
    return ids, list(df.answer[:n])


class ScriptedEngine:
    """A rollout engine that 'samples' given completions in turn (to drive the loop with known text)."""

    def __init__(self, tok, completions):
        self.tok, self.completions, self.i = tok, completions, 0

    def refresh(self):
        pass

    def generate(self, prompts, params, *, generator=None, batch_size=None):
        responses, truncated = [], []
        for _ in prompts:
            text = self.completions[self.i % len(self.completions)]
            self.i += 1
            ids = self.tok(text, add_special_tokens=False)["input_ids"][:params.max_new_tokens]
            cut = len(ids) == params.max_new_tokens
            responses.append(ids if cut else ids + [self.tok.eos_token_id])
            truncated.append(cut)
        pi, pm = tensors.left_pad(prompts, self.tok.pad_token_id)
        ri, rm = tensors.right_pad(responses, self.tok.pad_token_id)
        return ec_rollout.RolloutBatch(pi, pm, ri, rm, torch.zeros(ri.shape), torch.tensor(truncated))


# ---------------------------------------------------------------------------------------------- math


def test_kl_estimators_agree_with_their_formulas():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = logp - ref
    assert torch.allclose(core.kl_estimate(logp, ref, "k1"), d)
    assert torch.allclose(core.kl_estimate(logp, ref, "k2"), 0.5 * d ** 2)
    assert torch.allclose(core.kl_estimate(logp, ref, "k3"), torch.exp(-d) - 1 + d)
    assert (core.kl_estimate(logp, ref, "k3") >= 0).all()
    assert core.kl_estimate(logp, logp, "k3").abs().max() == 0
    # the k3 mean estimates KL(p || q) for samples from p
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        assert float(core.kl_estimate(p.log()[x], q.log()[x], kind).mean()) == pytest.approx(exact, abs=0.01)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        core.kl_estimate(logp, ref, "k4")


def test_aggregation_per_sequence_and_per_token():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert float(core.aggregate(x, mask, "seq_mean")) == pytest.approx((1 + 4) / 2)
    assert float(core.aggregate(x, mask, "token_mean")) == pytest.approx(8 / 5)
    # micro-batch pieces normalised by the minibatch totals add up to the whole
    for how in ("seq_mean", "token_mean"):
        parts = sum(core.aggregate(x[i:i + 1], mask[i:i + 1], how, n_seqs=2, n_tokens=5) for i in range(2))
        assert float(parts) == pytest.approx(float(core.aggregate(x, mask, how)))


def test_padding_never_enters_the_losses_or_their_gradients():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    logp = torch.randn(2, 4) - 1.0

    def losses(garbage):
        lp = logp.clone().requires_grad_(True)
        def fill(t):
            return torch.where(mask, t, torch.full_like(t, garbage))

        old, adv = fill(logp.detach() + 0.1), fill(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.3, 0, 0, 0]]))
        pl, _ = core.clipped_policy_loss(lp, old, adv, mask, 0.2, "seq_mean")
        kl = core.aggregate(core.kl_estimate(lp, fill(logp.detach() - 0.3), "k3", mask), mask, "token_mean")
        v = fill(torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0, 0, 0]])).requires_grad_(True)
        vl = core.clipped_value_loss(v, fill(torch.zeros(2, 4)), fill(torch.ones(2, 4)), mask, 0.2, "token_mean")
        (pl + kl + vl).backward()
        return float(pl.detach()), float(kl.detach()), float(vl.detach()), lp.grad.clone(), v.grad.clone()

    clean = losses(0.0)
    for garbage in (1e4, -1e4, float("inf"), float("nan")):
        dirty = losses(garbage)
        assert dirty[:3] == pytest.approx(clean[:3])
        assert torch.equal(dirty[3], clean[3]) and torch.equal(dirty[4], clean[4])
        assert torch.isfinite(dirty[3]).all()


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = core.whiten(x, mask)
    real = w[mask]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(real.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)   # population variance
    assert (w[~mask] == 0).all()


def test_make_optimizer_starts_at_the_peak_lr_without_warm_up():
    _, sched = core.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-3, (0.9, 0.95), 10, 0.0, 0.5)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)


def test_minibatches_cover_every_row_once():
    g = torch.Generator().manual_seed(0)
    mbs = core.minibatches(32, 8, g)
    assert len(mbs) == 4 and sorted(torch.cat(mbs).tolist()) == list(range(32))
    plain = core.minibatches(10, 4, g)
    assert [len(m) for m in plain] == [4, 4, 2] and sorted(torch.cat(plain).tolist()) == list(range(10))


def test_checkpoint_steps_are_log_spaced_plus_episode_ends():
    steps = core.checkpoint_steps(1160, 116, 15)
    assert steps[0] == 1 and steps[-1] == 1160
    assert set(range(116, 1161, 116)) <= set(steps)
    logs = [s for s in steps if s not in range(116, 1161, 116)]
    assert len(logs) >= 10 and logs[:4] == [1, 2, 3, 5]  # round(geomspace(1, 1160, 15))
    assert core.checkpoint_steps(5, 10, 0) == [5]


def test_group_advantages_sum_to_zero_and_flag_groups_without_spread():
    torch.manual_seed(0)
    r = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1.0])
    adv, flat = grpo.group_advantages(r, 4)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    assert flat.tolist() == [False, True, False]
    assert (adv.view(3, 4)[1] == 0).all()
    g = r.view(3, 4)[0]
    assert torch.allclose(adv[:4], (g - g.mean()) / (g.std() + 1e-9))


def test_gae_matches_a_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    d2 = 1.0 - 0.6
    d1 = 0.6 - 0.4
    d0 = 0.4 - 0.2
    a2, a1 = d2, d1 + 0.95 * d2
    a0 = d0 + 0.95 * a1
    assert torch.allclose(adv[0, :3], torch.tensor([a0, a1, a2]))
    assert adv[0, 3] == 0 and torch.allclose(ret[0, :3], adv[0, :3] + values[0, :3])
    # lambda = 1: advantage = reward-to-go minus the value
    adv1, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv1[0, :3], 1.0 - values[0, :3])


def test_token_rewards_put_the_task_reward_on_the_last_token_and_kl_on_every_token():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logp, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.5)
    r = ppo.token_rewards(torch.tensor([1.0, 0.0]), mask, 0.1, logp, ref, "k1")
    assert torch.allclose(r, torch.tensor([[-0.05, -0.05, 0.95, 0], [-0.05, -0.05, 0, 0]]))
    assert torch.equal(ppo.token_rewards(torch.tensor([1.0, 0.0]), mask, 0.0),
                       torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 0]]))


def test_truncated_responses_follow_the_configured_policy():
    scored = [core.Scored(True, "text", "1", None), core.Scored(True, "text", "1", None),
              core.Scored(False, "text", None, "no final answer")]
    truncated = torch.tensor([True, False, True])
    assert core.task_rewards(scored, truncated, "score").tolist() == [1, 1, 0]
    assert core.task_rewards(scored, truncated, "zero_reward").tolist() == [0, 1, 0]
    assert core.task_rewards(scored, truncated, "score", clip=(-10, 0.5)).tolist() == [0.5, 0.5, 0]


def test_format_stats_leave_accuracy_null_for_absent_formats():
    st = core.format_stats(["tinygsm", "tinygsm", "text", "tinygsm"], [True, False, True, True])
    assert st["share_tinygsm"] == 0.75 and st["share_text"] == 0.25 and st["share_omi1"] == 0
    assert st["acc_tinygsm"] == pytest.approx(2 / 3) and st["acc_text"] == 1.0 and st["acc_omi1"] is None


def test_scorer_failures_give_reward_zero_and_an_error_instead_of_a_crash():
    def flaky(completions, golds):
        if len(completions) > 1 or "boom" in completions[0]:
            raise RuntimeError("worker died")
        return [V(True, "text", "3", None)]

    out = core.score(["fine 3", "boom"], ["3", "3"], flaky)
    assert out[0].correct and out[0].error is None
    assert not out[1].correct and "worker died" in out[1].error and out[1].format == "text"


# ---------------------------------------------------------------------------------------------- model passes


def test_padding_tokens_do_not_change_log_probs_or_values(world):
    tr = make_trainer(world, kl_coef=0.01)
    tr.engine = ScriptedEngine(world["tok"], ["\\boxed{7}", "It is 12.", "def f():\n    return 3\n", "no"])
    prompts, golds = prompts_of(world)
    exp, _, _ = tr.rollout(prompts, golds)
    assert (~exp.prompt_mask).any() and (~exp.response_mask).any()
    noisy = copy.copy(exp)
    g = torch.Generator().manual_seed(3)
    vocab = len(world["tok"])
    noisy.prompt_ids = torch.where(exp.prompt_mask, exp.prompt_ids,
                                   torch.randint(0, vocab, exp.prompt_ids.shape, generator=g))
    noisy.response_ids = torch.where(exp.response_mask, exp.response_ids,
                                     torch.randint(0, vocab, exp.response_ids.shape, generator=g))
    again, _ = core.annotate(noisy, tr.policy, ref=tr.ref, critic=tr.critic, micro_batch_size=3,
                             temperature=tr.s.temperature)
    m = exp.response_mask
    for name in ("old_logprobs", "ref_logprobs", "values", "entropy"):
        a, b = getattr(exp, name), getattr(again, name)
        assert torch.allclose(a[m], b[m], atol=1e-5), name
        assert (b[~m] == 0).all()


def test_first_minibatch_has_ratio_one_no_clipping_and_no_kl(world):
    # at the sampling temperature too: the update scores at the same temperature as the rollout's pass
    for algo, temperature in (("ppo", 1.0), ("grpo", 1.0), ("ppo", 0.7), ("grpo", 0.7)):
        tr = make_trainer(world, algo=algo, kl_coef=0.01, temperature=temperature)
        prompts, golds = prompts_of(world)
        exp, _, _ = tr.rollout(prompts, golds)
        exp, _ = tr.advantages(exp)
        stats = tr.update(exp)
        assert len(stats) == 2  # 16 sequences / train_batch_size 8
        first = stats[0]
        assert first["ratio_dev"] < 1e-5, algo
        assert first["clip_frac"] == 0.0
        assert abs(first["approx_kl"]) < 1e-8


def test_learning_rate_zero_leaves_the_policy_unchanged(world):
    prompts, golds = prompts_of(world)
    for lr, changed in ((0.0, False), (1e-2, True)):
        tr = make_trainer(world, actor_lr=lr, critic_lr=lr, kl_coef=0.01)
        before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
        critic_before = {k: v.clone() for k, v in tr.critic.state_dict().items()}
        row, _ = tr.step(prompts, golds)
        same = all(torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
        same_critic = all(torch.equal(critic_before[k], v) for k, v in tr.critic.state_dict().items())
        assert same is not changed and same_critic is not changed
        assert row["grad_norm"] > 0


def test_grpo_advantages_are_constant_per_sample_and_zero_mean_per_group(world):
    tr = make_trainer(world, algo="grpo", samples_per_prompt=4)
    engine = ScriptedEngine(world["tok"], ["The answer is 1.", "wrong", "nope", "still wrong"])
    tr.engine = engine
    df = pd.read_parquet(world["prompts"])
    prompts, _ = prompts_of(world)
    exp, _, _ = tr.rollout(prompts, ["1"] * 4)
    exp, info = tr.advantages(exp)
    per_sample = exp.advantages[:, 0]
    assert torch.allclose(per_sample.view(4, 4).sum(1), torch.zeros(4), atol=1e-5)
    assert (per_sample.view(4, 4)[:, 0] > 0).all() and info["zero_std_groups"] == 0
    m = exp.response_mask
    assert torch.equal(exp.advantages[~m], torch.zeros(int((~m).sum())))
    assert len(df) >= 4


# ---------------------------------------------------------------------------------------------- runs


def read_run(out):
    return pd.read_parquet(out / "steps.parquet"), pd.read_parquet(out / "samples.parquet")


@pytest.mark.parametrize("algo", ["ppo", "grpo", "ei"])
def test_a_run_writes_steps_samples_and_checkpoints(world, tmp_path, algo):
    out = tmp_path / algo
    res = train.run(spec(algo=algo, kl_coef=0.01 if algo != "ei" else 0.0), base=world["base"],
                    prompts=world["prompts"], out=out, scorer=gold_in_text)
    steps, samples = read_run(out)
    assert list(steps.columns) == core.STEP_COLUMNS and list(samples.columns) == core.SAMPLE_COLUMNS
    assert steps.step.tolist() == [1, 2]
    assert not (out / "steps.partial.parquet").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["manifest.json", "step=1", "step=2"]
    assert manifest.steps(out / "checkpoints") == res["checkpoints"] == [1, 2]
    model, tok = ec_models.load_checkpoint(out / "checkpoints" / "step=2")
    assert model.config.hidden_size == 32
    row = steps.iloc[0]
    assert row.share_tinygsm + row.share_omi1 + row.share_text == pytest.approx(1.0)
    assert 0 <= row.reward <= 1 and row.response_len > 0 and row.tokens_per_s > 0
    assert (row.value_loss is not None and not math.isnan(row.value_loss)) == (algo == "ppo")
    assert math.isnan(row.zero_std_groups) == (algo != "grpo")
    if algo == "ei":
        assert not math.isnan(row["kept"]) and row["unique"] <= 24 * 3 and row["kept"] <= row["unique"]
    else:
        assert row.kl_div == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference itself
        assert row.clip_frac >= 0 and row.entropy > 0
    assert len(samples) == 6 and set(samples.step) == {1, 2}
    assert samples.completion.map(type).eq(str).all()


def test_same_seed_same_numbers(world, tmp_path):
    rows = []
    for name in ("a", "b"):
        train.run(spec(algo="grpo", kl_coef=0.01), base=world["base"], prompts=world["prompts"], out=tmp_path / name,
                  scorer=gold_in_text)
        rows.append(read_run(tmp_path / name)[0])
    cols = ["reward", "response_len", "entropy", "kl_div", "policy_loss", "grad_norm"]
    pd.testing.assert_frame_equal(rows[0][cols], rows[1][cols])
    w = [ec_models.load_checkpoint(tmp_path / n / "checkpoints" / "step=2")[0].state_dict() for n in ("a", "b")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_kl_zero_loads_no_reference_model(world, tmp_path, monkeypatch):
    calls = []
    real = ec_models.load_checkpoint

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(train.ec_models, "load_checkpoint", counting)
    for kl, loads in ((0.0, 1), (0.01, 2)):
        calls.clear()
        res = train.run(spec(algo="grpo", kl_coef=kl, max_steps=1), base=world["base"], prompts=world["prompts"],
                        out=tmp_path / f"kl{kl}", scorer=gold_in_text)
        assert len(calls) == loads
        assert (res["trainer"].ref is None) == (kl == 0)
        kl_logged = read_run(tmp_path / f"kl{kl}")[0].kl_div.iloc[0]
        assert math.isnan(kl_logged) == (kl == 0)


def test_truncated_policy_in_a_run(world, tmp_path):
    long = "def simple_math_problem() -> int:\n    result = 1 + 2 + 3 + 4 + 5\n    return result\n"
    short = "7"
    for policy in ("score", "zero_reward"):
        engine = ScriptedEngine(world["tok"], [long, short])
        res = train.run(spec(algo="grpo", truncated=policy, max_new_tokens=8, max_steps=1, samples_logged=16),
                        base=world["base"],
                        prompts=world["prompts"], out=tmp_path / policy, scorer=always_right, engine=engine)
        _, samples = read_run(tmp_path / policy)
        assert samples.truncated.any() and (~samples.truncated).any()
        cut = samples[samples.truncated]
        assert (cut.reward == (1.0 if policy == "score" else 0.0)).all()
        assert (samples[~samples.truncated].reward == 1.0).all()
        assert res["rows"][0]["trunc_rate"] == 0.5


def test_hanging_crashing_and_hostile_code_gets_zero_reward_and_the_run_goes_on(world, tmp_path):
    pytest.importorskip("echochamber.sandbox")
    hang = "def simple_math_problem() -> int:\n    while True:\n        pass\n"
    crash = "def simple_math_problem() -> int:\n    return 1 // 0\n"
    hostile = ("def simple_math_problem() -> int:\n    import os\n    os.kill(os.getppid(), 9)\n"
               "    return 12\n")
    # a write out of the snippet's directory (relative: no fixed path on this machine; tests/test_sandbox.py
    # checks such writes are refused)
    escape = "def simple_math_problem() -> int:\n    open('../x', 'w').write('x')\n    return 12\n"
    fine = "def simple_math_problem() -> int:\n    result = 12\n    return result\n"
    engine = ScriptedEngine(world["tok"], [hang, crash, hostile, escape])
    s = spec(algo="grpo", max_new_tokens=64, max_steps=2, samples_per_prompt=4, rollout_batch_size=1,
             train_batch_size=4)
    train.run(s, base=world["base"], prompts=world["prompts"], out=tmp_path / "bad", engine=engine)  # real scorer
    steps, samples = read_run(tmp_path / "bad")
    assert steps.step.tolist() == [2 - 1, 2] and (steps.reward == 0).all() and (steps.score_errors == 1).all()
    assert samples.error.notna().all() and not samples.correct.any()
    # and a correct program is still rewarded after all that
    verdict = core.score([fine], ["12"])[0]
    assert verdict.correct and verdict.format == "tinygsm"


def test_expert_iteration_keeps_distinct_verified_answers_and_learns_them(world, tmp_path):
    assert ei.keep_verified([0, 0, 0, 1, 1], [[1, 2], [1, 2], [3], [1, 2], [4]], [1, 1, 1, 0, 1]) == [0, 2, 4]
    capped = train.run(spec(algo="ei", ei=dict(rounds=1, samples_per_prompt=2, max_prompts=5, batch_size=4)),
                       base=world["base"], prompts=world["prompts"], out=tmp_path / "capped", scorer=gold_in_text)
    assert capped["rows"][0]["unique"] <= 10 and read_run(tmp_path / "capped")[1].prompt.nunique() <= 5
    right = "\\boxed{GOLD}"
    # 4 optimizer steps: the lr schedule warms up over 1, then reaches its floor on the last
    s = settings.Settings.from_spec(spec(algo="ei", ei=dict(rounds=2, samples_per_prompt=3, batch_size=4, epochs=4,
                                                            lr=3e-3, from_base=True)))
    policy, tok = ec_models.load_checkpoint(world["base"])
    prompts, golds = prompts_of(world, 2)
    texts = [right.replace("GOLD", str(g)) for g in golds]
    engine = ScriptedEngine(tok, [texts[0], texts[0], "no", texts[1], "nope", texts[1]])
    trainer = ei.ExpertIteration(s, policy, tok, scorer=gold_in_text, engine=engine)
    target = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]

    def nll():
        pi, pm = tensors.left_pad(prompts, tok.pad_token_id)
        ri, rm = tensors.right_pad(target, tok.pad_token_id)
        with torch.no_grad():
            return float(ei.sft_loss(policy, core.Experience(pi, pm, ri, rm), int(rm.sum())))

    before = nll()
    row, _ = trainer.round(1, prompts, golds)
    assert row["kept"] == 2 and row["unique"] == 4 and row["reward"] == pytest.approx(4 / 6)
    after = nll()
    assert after < before - 0.5
    # from_base: the next round starts again from the base weights (nothing kept -> the base model)
    trainer.engine = ScriptedEngine(tok, ["no"])
    row2, _ = trainer.round(2, prompts, golds)
    assert row2["kept"] == 0 and nll() == pytest.approx(before, abs=1e-6)


# ---------------------------------------------------------------------------------------------- settings


def test_cell_spec_holds_only_what_the_cell_uses():
    cfg = {"grid": {"mixtures": ["m"], "scales": ["s"], "seeds": [0],
                    "algos": {"ppo": {"kl": [0, 0.01]}, "grpo": {"kl": [0.01]}, "ei": {"kl": [0]}}},
           "rl": {"actor_lr": 1e-4, "grpo": {"epochs": 2}}}
    cells = ec_grid.rl_cells(cfg)
    by = {(c.algo, c.kl): settings.cell_spec(cfg, c) for c in cells}
    ppo0 = by[("ppo", 0.0)]
    assert ppo0["kl_coef"] == 0.0 and ppo0["actor_lr"] == 1e-4 and "grpo" not in ppo0 and "critic_lr" in ppo0
    assert by[("grpo", 0.01)]["grpo"]["epochs"] == 2 and "critic_lr" not in by[("grpo", 0.01)]
    assert "actor_lr" not in by[("ei", 0.0)] and by[("ei", 0.0)]["ei"]["rounds"] == 3
    edited = copy.deepcopy(cfg)
    edited["rl"]["grpo"]["epochs"] = 3
    edited["grid"]["algos"]["ppo"]["kl"] = [0, 0.01, 0.001]
    for c in ec_grid.rl_cells(edited):
        if c.algo != "grpo" and (c.algo, c.kl) in by:
            assert settings.cell_spec(edited, c) == by[(c.algo, c.kl)]
    assert settings.Settings.from_spec(ppo0).ppo.kl_estimator == "k1"


def test_rl_gpus_set_one_process_per_gpu_and_stay_out_of_the_spec():
    cfg = {"grid": {"mixtures": ["m"], "scales": ["s"], "seeds": [0], "algos": {"ppo": {"kl": [0]}}},
           "rl": {"gpus": 4, "processes": 1}}
    cell = ec_grid.rl_cells(cfg)[0]
    spec = settings.cell_spec(cfg, cell)
    assert spec["processes"] == 4 and "gpus" not in spec
    cfg["rl"]["gpus"] = 0  # a CPU run: the configured gloo processes
    assert settings.cell_spec(cfg, cell)["processes"] == 1


def test_config_checks_name_the_field():
    base = {"grid": {"algos": {"ei": {"kl": [0.01]}}}}
    with pytest.raises(ec_config.ConfigError, match=r"grid\.algos\.ei\.kl"):
        settings.check(base)
    bad = {"grid": {"algos": {"ppo": {"kl": [0]}}}, "rl": {"rollout_batch_size": 3, "samples_per_prompt": 3,
                                                          "train_batch_size": 4}}
    with pytest.raises(ec_config.ConfigError, match=r"rl\.train_batch_size"):
        settings.check(bad)
    settings.check({"grid": {"algos": {}}})


def test_config_yaml_rl_section_validates_and_typos_fail_in_one_sentence():
    cfg = ec_config.load(ec_config.SCHEMA_FILE.parents[1] / "config.yaml")
    assert cfg["rl"]["prompts"]["source"] in cfg["data"]["sources"]
    settings.check(cfg)
    assert ec_grid.rl_cells(cfg)
    for algo in ("ppo", "grpo", "ei"):
        bad = copy.deepcopy(cfg)
        bad["rl"].setdefault(algo, {})["learning_rate"] = 1
        with pytest.raises(ec_config.ConfigError, match=rf"rl\.{algo}: unknown key 'learning_rate'"):
            ec_config.validate(bad)


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_end_in_one_sentence_naming_the_file(world, tmp_path, capfd):
    with pytest.raises(train.RLInputError, match="does not exist"):
        train.load_prompts(tmp_path / "nope.parquet")
    pd.DataFrame({"question": ["q"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(train.RLInputError, match=r"p\.parquet has no column 'answer'"):
        train.load_prompts(tmp_path / "p.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(train.RLInputError, match="junk.parquet is not a readable parquet"):
        train.load_prompts(tmp_path / "junk.parquet")
    with pytest.raises(train.RLInputError, match="rollout_batch_size"):
        train.plan(settings.Settings.from_spec(spec(rollout_batch_size=100, max_steps=None)), 24)
    import json
    rc = train.main(["--spec", json.dumps(spec()), "--base", str(tmp_path / "missing"), "--prompts",
                     str(world["prompts"]), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capfd.readouterr().err
    assert "ERROR checkpoint " in err and "missing does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "steps.parquet").exists()

    # a base model whose weights differ from its manifest (same size): checked before it is loaded
    import shutil
    damaged = shutil.copytree(world["base"], tmp_path / "damaged")
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    rc = train.main(["--spec", json.dumps(spec()), "--base", str(damaged), "--prompts", str(world["prompts"]),
                     "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert (f"ERROR checkpoint {damaged} is damaged: the sha256 of model.safetensors differs from its manifest; "
            f"delete the folder {damaged} and run snakemake again to rewrite it") in err


def test_step_prompts_reshuffle_each_episode():
    a, e0 = train.step_prompts(20, 5, 1, 4, seed=0)
    b, _ = train.step_prompts(20, 5, 2, 4, seed=0)
    c, e1 = train.step_prompts(20, 5, 5, 4, seed=0)
    assert e0 == 0 and e1 == 1 and len(set(a) | set(b)) == 10
    ep0 = np.concatenate([train.step_prompts(20, 5, s, 4, 0)[0] for s in range(1, 5)])
    assert sorted(ep0) == list(range(20)) and not np.array_equal(a, c)
