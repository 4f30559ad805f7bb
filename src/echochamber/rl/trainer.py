"""The loop shared by PPO and GRPO, and what every algorithm's training needs.

``PolicyGradientTrainer``: sample, score, one no-grad pass for old log-probs / reference log-probs /
values / entropy, then minibatched clipped updates with gradient accumulation over micro-batches.
``ppo`` and ``grpo`` only define advantages and the loss. ``Accel`` stands in for ``accelerate`` in one
process; ``make_optimizer`` builds Adam and its cosine schedule; ``checkpoint_steps`` plans the saved steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from echochamber.rl.experience import Experience, annotate, micro_batches, minibatches, policy_logits
from echochamber.rl.losses import clipped_policy_loss, clipped_value_loss, kl_estimate, masked_sum
from echochamber.rl.scoring import score, task_rewards
from echochamber.rl.tables import rollout_row
from echochamber.schedule import lr_factor
from echochamber.tensors import token_logprobs


def make_optimizer(params, lr: float, betas, total_steps: int, warmup_ratio: float, min_ratio: float):
    """Adam without weight decay and its cosine schedule (stepped once per optimizer step)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=0.0)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, warmup=warmup, total=total_steps, min_ratio=min_ratio, floor_after_last=True))
    return opt, sched


def checkpoint_steps(total: int, per_episode: int, n: int) -> list[int]:
    """``n`` log-spaced steps in [1, total], each episode's end, and the last step."""
    steps = {total}
    if n > 0 and total > 0:
        steps |= {int(round(x)) for x in np.geomspace(1, total, n)}
    if per_episode > 0:
        steps |= set(range(per_episode, total + 1, per_episode))
    return sorted(s for s in steps if 1 <= s <= total)


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
            for idx in minibatches(len(exp), local_batch, self.shuffle):
                stats.append(self._minibatch_step(exp, idx))
        self.engine.refresh()
        return stats

    def _minibatch_step(self, exp: Experience, idx: torch.Tensor) -> dict:
        s, mbs = self.s, self.s.micro_batch_size
        totals = dict(clip=0.0, approx_kl=0.0, ratio_dev=0.0, policy_loss=0.0, value_loss=0.0)
        self.policy.train()
        # the packed reduction depends on which rows share a micro-batch: cut the shuffled minibatch in order
        chunks = micro_batches(exp, idx, mbs, in_order=s.loss_agg == "microbatch_token_mean")
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
