"""The helpers shared by rollout, RL and pretraining: padding, model inputs, token log-probs, the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from echochamber.schedule import lr_factor
from echochamber.tensors import left_pad, model_inputs, position_ids, right_pad, token_logprobs


def test_lr_schedule_at_warm_up_end_midpoint_and_last_step():
    # 111 steps, 10 of warm-up: the cosine spans steps 10..110, 100 intervals
    f = [lr_factor(s, warmup=10, total=111, min_ratio=0.1) for s in range(111)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])   # the first step already learns
    assert f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)     # warm-up ends at the peak
    assert f[60] == pytest.approx(0.55)                                   # halfway: halfway to the floor
    assert f[110] == pytest.approx(0.1)                                   # the last step trains at the floor
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(500, warmup=10, total=111, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, warmup=0, total=5, min_ratio=0.1) == pytest.approx(1.0)
    # pretraining's schedule before it was shared, unchanged
    assert lr_factor(60, warmup=10, total=110, min_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))


def test_lr_schedule_with_a_decay_phase_holds_the_peak_until_the_last_steps():
    # warm-up, stable, decay: 10 warm-up steps, the cosine over the last 41 of 111 steps (70..110)
    f = [lr_factor(s, warmup=10, total=111, min_ratio=0.1, decay=41) for s in range(111)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10:71] == pytest.approx([1.0] * 61)                          # the peak holds through step 70
    assert f[90] == pytest.approx(0.55)                                   # halfway through the decay
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    # a decay longer than the steps after the warm-up is the plain cosine
    assert [lr_factor(s, warmup=10, total=111, min_ratio=0.1, decay=500) for s in range(111)] == pytest.approx(
        [lr_factor(s, warmup=10, total=111, min_ratio=0.1) for s in range(111)])


def test_rl_schedule_reaches_the_floor_one_step_after_the_last_as_openrlhf():
    """transformers' get_cosine_with_min_lr_schedule_with_warmup after its warm-up (OpenRLHF's schedule)."""
    g = [lr_factor(s, warmup=10, total=110, min_ratio=0.1, floor_after_last=True) for s in range(111)]
    assert g[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert g[60] == pytest.approx(0.55)                                   # 50 of the 100 intervals
    assert g[109] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))  # the last step
    assert g[109] > 0.1 and g[110] == pytest.approx(0.1)


def test_padding_puts_prompts_right_and_responses_left():
    ids, mask = left_pad([[5, 6], [7], []], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7], [0, 0]] and mask.tolist() == [[1, 1], [0, 1], [0, 0]]
    ids, mask = right_pad([[5, 6], [7], []], pad=0)
    assert ids.tolist() == [[5, 6], [7, 0], [0, 0]] and mask.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    lp, _ = right_pad([[-0.5], [-1.0, -2.0]], 0.0, dtype=torch.float)
    assert lp.tolist() == [[-0.5, 0.0], [-1.0, -2.0]]


def test_model_inputs_count_positions_from_the_first_real_token():
    pi, pm = left_pad([[5, 6], [7]], pad_id=0)
    ri, rm = right_pad([[8], [9, 10]], pad=0)
    ids, mask, pos = model_inputs(pi, pm, ri, rm)
    assert ids.tolist() == [[5, 6, 8, 0], [0, 7, 9, 10]]
    assert mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    assert torch.equal(position_ids(pm), torch.tensor([[0, 1], [0, 0]]))


def test_token_logprobs_are_log_softmax_at_the_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    for t in (1.0, 0.7):
        want = (logits / t).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(token_logprobs(logits, tokens, t), want)
    # one position per row, as the rollout engine calls it
    torch.testing.assert_close(token_logprobs(logits[:, 0], tokens[:, 0]), logits[:, 0].log_softmax(-1).gather(
        -1, tokens[:, :1])[:, 0])
