"""The shared RL core: experience, log-probs, KL estimators, loss aggregation, minibatches, schedule, logging.

Layout of a rollout batch: prompts left-padded ``[B, P]``, responses right-padded ``[B, T]``; the model
reads ``prompt + response`` with position ids counted from each prompt's first real token, and the
hidden state at position ``P - 1 + t`` predicts response token ``t``. Every per-token tensor of an
``Experience`` is ``[B, T]`` and aligned with ``response_mask``; padding never enters a loss because
every reduction goes through ``masked_sum`` (which fills padding with 0, so even inf/NaN there is harmless).

``PolicyGradientTrainer`` holds the loop shared by PPO and GRPO: sample, score, one no-grad pass for old
log-probs / reference log-probs / values / entropy, then minibatched clipped updates with gradient
accumulation over micro-batches. ``ppo`` and ``grpo`` only define advantages and the loss.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from echochamber import formats as ec_formats
from echochamber.schedule import lr_factor
from echochamber.tensors import model_inputs, token_logprobs

log = logging.getLogger("echochamber.rl")

# ---------------------------------------------------------------------------------------------- math


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = x.masked_fill(~mask, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimators of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3).

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2; k3 = q/p - 1 - log(q/p)
    (unbiased and never negative; its log-ratio is clamped to +-20 so exp cannot overflow). With ``mask``,
    padding gets 0 and no gradient.
    """
    log_ratio = logp.float() - ref_logp.float()
    if mask is not None:
        log_ratio = log_ratio.masked_fill(~mask, 0.0)
    if kind == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: k1, k2, k3")


LOSS_AGGREGATIONS = ("microbatch_token_mean", "seq_mean", "token_mean")


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str, *, n_seqs: int | None = None,
              n_tokens: int | None = None, n_micro: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss ``x [b, T]`` (one micro-batch) to a scalar.

    - ``microbatch_token_mean`` (the paper's runs: OpenRLHF 0.6.3 with ``--packing_samples``): the mean
      over this micro-batch's tokens, divided by ``n_micro``, the minibatch's number of micro-batches, so
      the minibatch loss is the average of the micro-batches' token means;
    - ``seq_mean`` (OpenRLHF without packing): the mean over each sequence's tokens, then over the
      minibatch's ``n_seqs`` sequences;
    - ``token_mean``: one mean over the minibatch's ``n_tokens`` tokens.

    The ``n_*`` are the minibatch's totals (default: this micro-batch's), so the micro-batch losses add
    up to the minibatch loss exactly.
    """
    if how == "microbatch_token_mean":
        return masked_sum(x, mask) / mask.sum().clamp(min=1) / (n_micro if n_micro is not None else 1)
    if how == "seq_mean":
        per_seq = masked_sum(x, mask, dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / (n_seqs if n_seqs is not None else x.shape[0])
    if how == "token_mean":
        return masked_sum(x, mask) / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    raise ValueError(f"unknown loss aggregation {how!r}; allowed: {', '.join(LOSS_AGGREGATIONS)}")


def clipped_policy_loss(logp, old_logp, adv, mask, clip_eps: float, how: str, *, n_seqs=None, n_tokens=None,
                        n_micro=None):
    """PPO's clipped surrogate, aggregated by ``how``; padding (whatever it holds) gives neither loss nor gradient.

    Returns the loss and token-level sums for logging: clipped tokens, the k3 estimate of KL(old || new),
    and the mean |ratio - 1| of this batch.
    """
    old_logp = old_logp.masked_fill(~mask, 0.0)
    adv = adv.masked_fill(~mask, 0.0)
    log_ratio = (logp.float() - old_logp).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = aggregate(surrogate, mask, how, n_seqs=n_seqs, n_tokens=n_tokens, n_micro=n_micro)
    with torch.no_grad():
        stats = {"clipped": float(masked_sum(((ratio - 1).abs() > clip_eps).float(), mask)),
                 "approx_kl_sum": float(masked_sum(torch.expm1(log_ratio) - log_ratio, mask)),
                 "ratio_dev": float(masked_mean((ratio - 1).abs(), mask))}
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, clip: float, how: str, *, n_seqs=None, n_tokens=None,
                       n_micro=None):
    """0.5 * max((v - R)^2, (v_clipped - R)^2) with v_clipped within ``clip`` of the rollout's values."""
    values = values.float().masked_fill(~mask, 0.0)
    old_values = old_values.masked_fill(~mask, 0.0)
    returns = returns.masked_fill(~mask, 0.0)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns).square(), (v_clip - returns).square())
    return aggregate(loss, mask, how, n_seqs=n_seqs, n_tokens=n_tokens, n_micro=n_micro)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries, with the population variance clamped at ``eps`` (as
    OpenRLHF 0.6.3 whitens advantages); ``reduce`` sums across processes when distributed."""
    stats = torch.stack([masked_sum(x, mask), masked_sum(x.square(), mask), mask.sum().to(x.dtype)]).float()
    if reduce is not None:
        stats = reduce(stats)
    total, total_sq, n = stats.unbind()
    mean = total / n.clamp(min=1)
    var = total_sq / n.clamp(min=1) - mean.square()
    return ((x - mean) * torch.rsqrt(var.clamp(min=eps))).masked_fill(~mask, 0.0)


def make_optimizer(params, lr: float, betas, total_steps: int, warmup_ratio: float, min_ratio: float):
    """Adam without weight decay and its cosine schedule (stepped once per optimizer step)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=0.0)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, warmup=warmup, total=total_steps, min_ratio=min_ratio))
    return opt, sched


def minibatches(n: int, size: int, generator: torch.Generator | None = None, group: int = 1) -> list[torch.Tensor]:
    """Shuffle ``n`` rows into minibatches of ``size``; rows ``group`` apart stay together when ``group`` divides
    ``size``."""
    if group > 1 and size % group == 0 and n % group == 0:
        order = torch.randperm(n // group, generator=generator)
        order = (order[:, None] * group + torch.arange(group)).reshape(-1)
    else:
        order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]


def checkpoint_steps(total: int, per_episode: int, n: int) -> list[int]:
    """``n`` log-spaced steps in [1, total], each episode's end, and the last step."""
    steps = {total}
    if n > 0 and total > 0:
        steps |= {int(round(x)) for x in np.geomspace(1, total, n)}
    if per_episode > 0:
        steps |= set(range(per_episode, total + 1, per_episode))
    return sorted(s for s in steps if 1 <= s <= total)


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class Experience:
    """One rollout batch with everything the updates need; per-token tensors are ``[B, T]``."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor | None = None        # [B] task reward (after clipping / truncation policy)
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    group: torch.Tensor | None = None          # [B] prompt index of each sample

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: torch.Tensor, trim: bool = True) -> Experience:
        """Rows ``idx``, with all-padding prompt columns (left) and response columns (right) cut off."""
        pm, rm = self.prompt_mask[idx], self.response_mask[idx]
        p0 = int((~pm.any(0)).long().cumprod(0).sum()) if trim else 0
        p0 = min(p0, pm.shape[1] - 1)  # keep at least one prompt column: it predicts response token 0
        t1 = int(rm.any(0).nonzero().max()) + 1 if trim and rm.any() else rm.shape[1]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name.startswith("prompt_"):
                out[f.name] = v[idx][:, p0:]
            elif v.dim() == 2:
                out[f.name] = v[idx][:, :t1]
            else:
                out[f.name] = v[idx]
        return Experience(**out)

    def to(self, device) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def micro_batches(exp: Experience, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Rows ``idx`` in chunks of ``size``, sorted by length so that each chunk carries little padding."""
    lengths = (exp.prompt_mask.sum(1) + exp.response_mask.sum(1)).cpu()[idx.cpu()]
    idx = idx[torch.argsort(lengths, descending=True, stable=True).to(idx.device)]
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def policy_logits(model, exp: Experience) -> torch.Tensor:
    """Logits ``[b, T, vocab]`` predicting each response token (only those positions go through the head)."""
    ids, mask, pos = model_inputs(exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.response_mask)
    t = exp.response_ids.shape[1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=t + 1, use_cache=False)
    return out.logits[:, :-1]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = (logits.float() if temperature == 1 else logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


@torch.no_grad()
def annotate(exp: Experience, policy, *, ref=None, critic=None, micro_batch_size: int = 16,
             autocast=contextlib.nullcontext, temperature: float = 1.0,
             sampled_logprobs: torch.Tensor | None = None) -> tuple[Experience, float | None]:
    """One no-grad pass per model over the rollout: old log-probs and entropy (at the sampling
    ``temperature``), reference log-probs (same temperature), values.

    Also returns the summed |difference| between ``sampled_logprobs`` (the rollout engine's, at
    temperature 1) and this pass's temperature-1 log-probs: a check that sampling and training see the
    same model (None without ``sampled_logprobs``).
    """
    n, width = len(exp), exp.response_ids.shape[1]
    old, ent = torch.zeros(n, width), torch.zeros(n, width)
    raw = torch.zeros(n, width) if sampled_logprobs is not None else None
    ref_lp = torch.zeros(n, width) if ref is not None else None
    values = torch.zeros(n, width) if critic is not None else None
    for idx in micro_batches(exp, torch.arange(n), micro_batch_size):
        idx = idx.cpu()
        mb = exp.select(idx)
        with autocast():
            logits = policy_logits(policy, mb)
            old[idx, :logits.shape[1]] = token_logprobs(logits, mb.response_ids, temperature).cpu()
            ent[idx, :logits.shape[1]] = token_entropy(logits, temperature).cpu()
            if raw is not None:     # at temperature 1 the old log-probs are the raw ones: no second pass
                raw[idx, :logits.shape[1]] = (old[idx, :logits.shape[1]] if temperature == 1 else
                                              token_logprobs(logits, mb.response_ids).cpu())
            del logits
            if ref is not None:
                logits = policy_logits(ref, mb)
                ref_lp[idx, :logits.shape[1]] = token_logprobs(logits, mb.response_ids, temperature).cpu()
                del logits
            if critic is not None:
                v = critic(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
                values[idx, :v.shape[1]] = v.float().cpu()
    dev = exp.response_ids.device
    mask = exp.response_mask.cpu()

    def put(x):
        return None if x is None else x.masked_fill(~mask, 0.0).to(dev)

    gap = None if raw is None else float(masked_sum((sampled_logprobs.cpu().float() - raw).abs(), mask))
    return replace(exp, old_logprobs=put(old), entropy=put(ent), ref_logprobs=put(ref_lp), values=put(values)), gap


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real response token (0 for an empty row)."""
    return (mask.long().sum(1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------- rewards


@dataclass
class Scored:
    """One completion's verdict as the RL loop records it."""
    correct: bool
    format: str
    answer: str | None
    error: str | None


def default_scorer():
    try:
        from echochamber.reward import score_batch
    except ModuleNotFoundError as e:
        if e.name != "echochamber.reward":
            raise
        raise RuntimeError("echochamber.reward is not installed: RL needs its score_batch to reward answers") from None
    return score_batch


def _as_scored(verdict, completion: str) -> Scored:
    fmt = getattr(verdict, "format", None)
    return Scored(correct=bool(getattr(verdict, "correct", False)),
                  format=fmt if fmt in ec_formats.FORMATS else ec_formats.classify(completion),
                  answer=None if getattr(verdict, "answer", None) is None else str(verdict.answer),
                  error=getattr(verdict, "error", None))


def score(completions: list[str], golds: list[str], scorer=None) -> list[Scored]:
    """Verdicts for completions; a scorer failure on one completion gives it reward 0 and an error, never a crash."""
    scorer = scorer or default_scorer()
    try:
        verdicts = list(scorer(completions, golds))
        if len(verdicts) != len(completions):
            raise RuntimeError(f"scorer returned {len(verdicts)} verdicts for {len(completions)} completions")
    except Exception as e:  # noqa: BLE001 - the run must go on; score one by one to isolate the culprit
        log.warning("batch scoring failed (%s: %s); scoring completions one by one", type(e).__name__, e)
        verdicts = []
        for c, g in zip(completions, golds):
            try:
                verdicts.append(scorer([c], [g])[0])
            except Exception as e1:  # noqa: BLE001
                verdicts.append(Scored(False, ec_formats.classify(c), None, f"scorer error: {type(e1).__name__}: {e1}"))
    return [_as_scored(v, c) for v, c in zip(verdicts, completions)]


def task_rewards(scored: list[Scored], truncated: torch.Tensor, policy: str, clip=None) -> torch.Tensor:
    """1 for a correct answer, else 0; a response cut at the length limit gets 0 under ``zero_reward``."""
    r = torch.tensor([float(s.correct) for s in scored])
    if policy == "zero_reward":
        r = r.masked_fill(truncated.cpu().bool(), 0.0)
    elif policy != "score":
        raise ValueError(f"unknown truncation policy {policy!r}; allowed: score, zero_reward")
    if clip is not None:
        r = r.clamp(clip[0], clip[1])
    return r


def format_stats(formats: list[str], correct: list[bool]) -> dict:
    """share_<format> and acc_<format> (None where a format is absent) for the three formats."""
    out = {}
    n = max(1, len(formats))
    for f in ec_formats.FORMATS:
        hits = [c for fmt, c in zip(formats, correct) if fmt == f]
        out[f"share_{f}"] = len(hits) / n
        out[f"acc_{f}"] = (sum(hits) / len(hits)) if hits else None
    return out


# ---------------------------------------------------------------------------------------------- logging

STEP_COLUMNS = [
    "step", "episode", "reward", "accuracy",
    *(f"share_{f}" for f in ec_formats.FORMATS), *(f"acc_{f}" for f in ec_formats.FORMATS),
    "kl_div", "entropy", "clip_frac", "approx_kl", "ratio_dev", "policy_loss", "value_loss", "value_mean",
    "grad_norm", "critic_grad_norm", "lr", "critic_lr",
    "response_len", "trunc_rate", "tokens_per_s", "zero_std_groups", "score_errors", "logprob_gap",
    "kept", "unique", "sft_loss", "rollout_s", "score_s", "train_s", "step_s",
]
SAMPLE_COLUMNS = ["step", "prompt", "completion", "format", "correct", "answer", "error", "gold",
                  "reward", "truncated"]


def write_table(rows: list[dict], columns: list[str], path) -> None:
    """Write rows as parquet atomically, with a stable column set (missing values are null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from echochamber.io import atomic_path

    data = {c: [r.get(c) for r in rows] for c in columns}
    table = pa.table({c: pa.array(v, type=_column_type(c, v)) for c, v in data.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _column_type(name: str, values: list):
    import pyarrow as pa
    if name in ("step", "episode", "kept", "unique"):
        return pa.int64()
    if name in ("prompt", "completion", "format", "answer", "error", "gold"):
        return pa.string()
    if name in ("correct", "truncated"):
        return pa.bool_()
    return pa.float64()


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class Accel:
    """What the trainers need from ``accelerate`` (a single-process stand-in when not given one)."""
    accelerator: object | None = None

    @property
    def device(self):
        return self.accelerator.device if self.accelerator else torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def backward(self, loss):
        if self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def no_sync(self, model, last: bool):
        if self.accelerator and not last and self.world > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def autocast(self):
        return self.accelerator.autocast() if self.accelerator else contextlib.nullcontext()

    def clip(self, params, max_norm: float) -> float:
        if self.accelerator:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum") if self.accelerator and self.world > 1 else t

    def gather(self, items: list) -> list:
        if self.accelerator and self.world > 1:
            from accelerate.utils import gather_object
            return gather_object(items)
        return items

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()


class PolicyGradientTrainer:
    """Rollout -> score -> annotate -> advantages -> clipped minibatch updates; PPO and GRPO fill in the rest."""

    uses_critic = False

    def __init__(self, settings, policy, tokenizer, *, ref=None, critic=None, scorer=None, accel: Accel | None = None,
                 total_updates: int = 1, engine=None):
        from echochamber import rollout as ec_rollout

        self.s, self.tok = settings, tokenizer
        self.accel = accel or Accel()
        self.policy, self.ref, self.critic = policy, ref, critic
        self.scorer = scorer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.opt, self.sched = make_optimizer(policy.parameters(), settings.actor_lr, settings.betas, total_updates,
                                              settings.warmup_ratio, settings.min_lr_ratio)
        if critic is not None:
            self.critic_opt, self.critic_sched = make_optimizer(
                critic.parameters(), settings.critic_lr, settings.betas, total_updates,
                settings.warmup_ratio, settings.min_lr_ratio)
        if self.accel.accelerator is not None:
            acc = self.accel.accelerator
            self.policy, self.opt = acc.prepare(self.policy, self.opt)
            if critic is not None:
                self.critic, self.critic_opt = acc.prepare(self.critic, self.critic_opt)
        self.engine = engine or ec_rollout.RolloutEngine(self.accel.unwrap(self.policy), eos_id=self.eos_id,
                                                         pad_id=self.pad_id, compile=settings.compile)
        self.sampling = ec_rollout.SamplingParams(max_new_tokens=settings.max_new_tokens,
                                                  temperature=settings.temperature, top_p=settings.top_p)
        self.generator = torch.Generator(self.accel.device).manual_seed(1_000_003 * settings.seed + self.accel.rank)
        self.shuffle = torch.Generator().manual_seed(settings.seed + 7919 * self.accel.rank)

    # resume -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Weights, optimizers and schedules (the same on every process); the reference is the base model."""
        state = {"policy": self.accel.unwrap(self.policy).state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict()}
        if self.critic is not None:
            state.update(critic=self.accel.unwrap(self.critic).state_dict(), critic_opt=self.critic_opt.state_dict(),
                         critic_sched=self.critic_sched.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.accel.unwrap(self.policy).load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.critic is not None:
            self.accel.unwrap(self.critic).load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
            self.critic_sched.load_state_dict(state["critic_sched"])
        self.engine.refresh()

    def rng_state(self) -> dict:
        """This process's generators: sampling and minibatch shuffling."""
        return {"generator": self.generator.get_state(), "shuffle": self.shuffle.get_state()}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.shuffle.set_state(state["shuffle"])

    # hooks ------------------------------------------------------------------------------------------

    def advantages(self, exp: Experience) -> tuple[Experience, dict]:
        raise NotImplementedError

    def extra_loss(self, mb: Experience, logp: torch.Tensor, counts: dict) -> torch.Tensor | None:
        """An extra loss term of one micro-batch (``counts``: the minibatch totals ``aggregate`` takes)."""
        return None

    def group_size(self) -> int:
        return 1

    # rollout --------------------------------------------------------------------------------------

    def rollout(self, prompts: list[list[int]], golds: list[str]) -> tuple[Experience, list[dict], dict]:
        """Sample ``samples_per_prompt`` responses per prompt, score them, build the annotated experience."""
        k = self.s.samples_per_prompt
        flat = [p for p in prompts for _ in range(k)]
        t0 = time.perf_counter()
        batch = self.engine.generate(flat, self.sampling, generator=self.generator)
        rollout_s = time.perf_counter() - t0
        texts = self.tok.batch_decode(
            [ids[m].tolist() for ids, m in zip(batch.response_ids.cpu(), batch.response_mask.cpu())],
            skip_special_tokens=True)
        t0 = time.perf_counter()
        scored = score(texts, [g for g in golds for _ in range(k)], self.scorer)
        score_s = time.perf_counter() - t0
        truncated = batch.truncated.cpu()
        rewards = task_rewards(scored, truncated, self.s.truncated, self.s.reward_clip)
        dev = self.accel.device
        exp = Experience(prompt_ids=batch.prompt_ids.to(dev), prompt_mask=batch.prompt_mask.to(dev),
                         response_ids=batch.response_ids.to(dev), response_mask=batch.response_mask.to(dev),
                         rewards=rewards.to(dev), group=torch.arange(len(flat), device=dev) // k)
        exp, gap = annotate(exp, self.policy, ref=self.ref, critic=self.critic,
                            micro_batch_size=self.s.micro_batch_size, autocast=self.accel.autocast,
                            temperature=self.s.temperature, sampled_logprobs=batch.logprobs)
        n_tok = int(batch.response_mask.sum())
        prompt_texts = self.tok.batch_decode(prompts, skip_special_tokens=True)
        records = [dict(prompt=prompt_texts[i // k], completion=t, format=sc.format, correct=sc.correct,
                        answer=sc.answer, error=sc.error, gold=str(golds[i // k]), reward=float(r),
                        truncated=bool(tr), length=int(m.sum()))
                   for i, (t, sc, r, tr, m) in enumerate(zip(texts, scored, rewards, truncated, batch.response_mask))]
        mask = exp.response_mask
        info = {"rollout_s": rollout_s, "score_s": score_s, "tokens": n_tok,
                "entropy_sum": float(masked_sum(exp.entropy, mask)),
                "logprob_gap_sum": gap}
        if exp.ref_logprobs is not None:
            info["kl_sum"] = float(masked_sum(kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k1"), mask))
        if exp.values is not None:
            info["value_sum"] = float(masked_sum(exp.values, mask))
        return exp, records, info

    # update ---------------------------------------------------------------------------------------

    def update(self, exp: Experience) -> list[dict]:
        """Clipped policy-gradient steps over minibatches of the experience; stats per minibatch."""
        local_batch = self.s.train_batch_size // self.accel.world
        epochs = getattr(getattr(self.s, self.s.algo, None), "epochs", 1)
        stats = []
        for _ in range(epochs):
            for idx in minibatches(len(exp), local_batch, self.shuffle, self.group_size()):
                stats.append(self._minibatch_step(exp, idx))
        self.engine.refresh()
        return stats

    def _minibatch_step(self, exp: Experience, idx: torch.Tensor) -> dict:
        s, mbs = self.s, self.s.micro_batch_size
        totals = dict(clip=0.0, approx_kl=0.0, ratio_dev=0.0, policy_loss=0.0, value_loss=0.0)
        self.policy.train()
        chunks = micro_batches(exp, idx, mbs)
        n_tokens = int(exp.response_mask[idx].sum())
        counts = {"n_seqs": len(idx), "n_tokens": n_tokens, "n_micro": len(chunks)}
        for j, chunk in enumerate(chunks):
            mb = exp.select(chunk)
            mask = mb.response_mask
            last = j == len(chunks) - 1
            with self.accel.no_sync(self.policy, last), self.accel.autocast():
                logp = token_logprobs(policy_logits(self.policy, mb), mb.response_ids, s.temperature)
                loss, st = clipped_policy_loss(logp, mb.old_logprobs, mb.advantages, mask, s.clip_eps, s.loss_agg,
                                               **counts)
                extra = self.extra_loss(mb, logp, counts)
                self.accel.backward(loss if extra is None else loss + extra)
            totals["policy_loss"] += float(loss.detach())
            totals["clip"] += st["clipped"]
            totals["approx_kl"] += st["approx_kl_sum"]
            totals["ratio_dev"] = max(totals["ratio_dev"], st["ratio_dev"])
            if self.critic is not None:
                with self.accel.no_sync(self.critic, last), self.accel.autocast():
                    v = self.critic(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
                    vloss = clipped_value_loss(v, mb.values, mb.returns, mask, s.value_clip, s.loss_agg, **counts)
                    self.accel.backward(vloss)
                totals["value_loss"] += float(vloss.detach())
        out = {"clip_frac": totals["clip"] / max(1, n_tokens), "approx_kl": totals["approx_kl"] / max(1, n_tokens),
               "ratio_dev": totals["ratio_dev"], "policy_loss": totals["policy_loss"],
               "lr": self.sched.get_last_lr()[0]}
        out["grad_norm"] = self.accel.clip(self.policy.parameters(), s.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.critic is not None:
            out["value_loss"] = totals["value_loss"]
            out["critic_lr"] = self.critic_sched.get_last_lr()[0]
            out["critic_grad_norm"] = self.accel.clip(self.critic.parameters(), s.grad_clip)
            self.critic_opt.step()
            self.critic_sched.step()
            self.critic_opt.zero_grad(set_to_none=True)
        return out

    # one step -------------------------------------------------------------------------------------

    def step(self, prompts: list[list[int]], golds: list[str]) -> tuple[dict, list[dict]]:
        """One rollout step on this process's prompts: returns the logged row (global) and the records."""
        exp, records, info = self.rollout(prompts, golds)
        exp, adv_info = self.advantages(exp)
        t0 = time.perf_counter()
        stats = self.update(exp)
        train_s = time.perf_counter() - t0
        return self._row(records, info, adv_info, stats, train_s), records

    def _row(self, records, info, adv_info, stats, train_s) -> dict:
        """Combine this step's numbers over processes into one row of steps.parquet."""
        everyone = self.accel.gather([{"records": [{k: r[k] for k in ("format", "correct", "reward", "truncated",
                                                                      "length", "error")} for r in records],
                                       "info": info, "adv": adv_info}])
        recs = [r for part in everyone for r in part["records"]]
        infos = [part["info"] for part in everyone]
        tokens = sum(i["tokens"] for i in infos)
        row = {
            **rollout_row(recs, infos, train_s),
            "entropy": sum(i["entropy_sum"] for i in infos) / max(1, tokens),
            "logprob_gap": sum(i["logprob_gap_sum"] for i in infos) / max(1, tokens),
            "kl_div": (sum(i["kl_sum"] for i in infos) / max(1, tokens)) if "kl_sum" in infos[0] else None,
            "value_mean": (sum(i["value_sum"] for i in infos) / max(1, tokens)) if "value_sum" in infos[0] else None,
        }
        for key in ("clip_frac", "approx_kl", "policy_loss", "value_loss", "grad_norm", "critic_grad_norm"):
            vals = [st[key] for st in stats if key in st]
            row[key] = float(np.mean(vals)) if vals else None
        row["ratio_dev"] = float(max(st["ratio_dev"] for st in stats)) if stats else None
        row["lr"] = stats[-1]["lr"] if stats else None
        row["critic_lr"] = stats[-1].get("critic_lr") if stats else None
        if "zero_std_groups" in everyone[0]["adv"]:
            z = [part["adv"]["zero_std_groups"] for part in everyone]
            row["zero_std_groups"] = float(np.mean(z))
        return row


def rollout_row(recs: list[dict], infos: list[dict], train_s: float) -> dict:
    """The columns every algorithm logs for one rollout step: reward, formats, lengths, timings."""
    tokens = sum(i["tokens"] for i in infos)
    counted = [r["reward"] > 0 for r in recs]
    rollout_s = max(i["rollout_s"] for i in infos)
    return {
        "reward": float(np.mean([r["reward"] for r in recs])),
        "accuracy": float(np.mean(counted)),
        **format_stats([r["format"] for r in recs], counted),
        "response_len": tokens / max(1, len(recs)),
        "trunc_rate": float(np.mean([r["truncated"] for r in recs])),
        "score_errors": float(np.mean([r["error"] is not None for r in recs])),
        "rollout_s": rollout_s,
        "score_s": max(i["score_s"] for i in infos),
        "tokens_per_s": tokens / max(1e-9, rollout_s),
        "train_s": train_s,
    }
