"""Expert Iteration: sample k answers per prompt, keep the verified ones (no duplicates), fine-tune on them.

Each round samples from the current model (temperature 1.0, top_p 0.95 in the paper), keeps the correct
and distinct completions, then runs supervised fine-tuning with the loss on response tokens only, for
``epochs`` epochs, starting from the base weights (``from_base``, the paper) or from the current model
(online). The model after round r is checkpoint ``step=r``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from echochamber.rl.experience import Experience, policy_logits
from echochamber.rl.losses import masked_sum
from echochamber.rl.scoring import score, task_rewards
from echochamber.rl.tables import rollout_row
from echochamber.rl.trainer import Accel, make_optimizer
from echochamber.tensors import left_pad, right_pad, token_logprobs


def keep_verified(prompt_index: list[int], responses: list[list[int]], rewards: list[float]) -> list[int]:
    """Indices of rewarded responses, first occurrence of each distinct (prompt, response) only."""
    seen, keep = set(), []
    for i, (p, resp, r) in enumerate(zip(prompt_index, responses, rewards)):
        key = (p, tuple(resp))
        if r > 0 and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def sft_loss(model, exp: Experience, n_tokens: int) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens, divided by the minibatch's token count."""
    logp = token_logprobs(policy_logits(model, exp), exp.response_ids)
    return -masked_sum(logp, exp.response_mask) / max(1, n_tokens)


class ExpertIteration:
    def __init__(self, settings, policy, tokenizer, *, scorer=None, accel: Accel | None = None, engine=None):
        from echochamber import rollout as ec_rollout

        self.s, self.e, self.tok = settings, settings.ei, tokenizer
        self.accel = accel or Accel()
        self.policy, self.scorer = policy, scorer
        self.base_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        if self.accel.accelerator is not None:
            self.policy = self.accel.accelerator.prepare(self.policy)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.engine = engine or ec_rollout.RolloutEngine(self.accel.unwrap(self.policy), eos_id=self.eos_id,
                                                         pad_id=self.pad_id, compile=settings.compile)
        self.sampling = ec_rollout.SamplingParams(max_new_tokens=settings.max_new_tokens,
                                                  temperature=self.e.temperature, top_p=self.e.top_p)
        self.generator = torch.Generator(self.accel.device).manual_seed(1_000_003 * settings.seed + self.accel.rank)

    # resume -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The model after the last round (each round makes its own optimizer and seeds its own order)."""
        return {"policy": self.accel.unwrap(self.policy).state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accel.unwrap(self.policy).load_state_dict(state["policy"])
        self.engine.refresh()

    def rng_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # sampling ------------------------------------------------------------------------------------

    def collect(self, prompts: list[list[int]], golds: list[str], prompt_offset: int = 0):
        """Sample k answers for each prompt of this process, score them; return records and timing."""
        k, chunk = self.e.samples_per_prompt, self.s.rollout_batch_size
        records, rollout_s, score_s, tokens = [], 0.0, 0.0, 0
        texts_prompt = self.tok.batch_decode(prompts, skip_special_tokens=True)
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            flat = [p for p in part for _ in range(k)]
            t0 = time.perf_counter()
            batch = self.engine.generate(flat, self.sampling, generator=self.generator)
            rollout_s += time.perf_counter() - t0
            ids, masks = batch.response_ids.cpu(), batch.response_mask.cpu()
            responses = [i[m].tolist() for i, m in zip(ids, masks)]
            tokens += int(masks.sum())
            texts = self.tok.batch_decode(responses, skip_special_tokens=True)
            part_golds = [golds[start + i // k] for i in range(len(flat))]
            t0 = time.perf_counter()
            scored = score(texts, part_golds, self.scorer)
            score_s += time.perf_counter() - t0
            rewards = task_rewards(scored, batch.truncated.cpu(), self.s.truncated)
            for i, (resp, text, sc, r, tr) in enumerate(zip(responses, texts, scored, rewards, batch.truncated.cpu())):
                p = start + i // k
                records.append(dict(prompt_index=prompt_offset + p, prompt_ids=prompts[p], response_ids=resp,
                                    prompt=texts_prompt[p], completion=text, format=sc.format, correct=sc.correct,
                                    answer=sc.answer, error=sc.error, gold=str(golds[p]), reward=float(r),
                                    truncated=bool(tr), length=len(resp)))
        return records, {"rollout_s": rollout_s, "score_s": score_s, "tokens": tokens}

    # fine-tuning ----------------------------------------------------------------------------------

    def sft(self, examples: list[tuple[list[int], list[int]]], round_index: int) -> dict:
        """Supervised fine-tuning on (prompt, response) pairs; every process holds the same list."""
        model = self.policy
        if self.e.from_base:
            self.accel.unwrap(model).load_state_dict(self.base_state)
        if not examples:
            self.engine.refresh()
            return {"sft_loss": None, "lr": None, "grad_norm": None}
        world, rank = self.accel.world, self.accel.rank
        n = len(examples)
        per_epoch = math.ceil(n / self.e.batch_size)
        opt, sched = make_optimizer(model.parameters(), self.e.lr, self.s.betas, per_epoch * self.e.epochs,
                                    self.e.warmup_ratio, self.s.min_lr_ratio)
        if self.accel.accelerator is not None:
            opt = self.accel.accelerator.prepare(opt)
        rng = np.random.default_rng([self.s.seed, round_index])
        losses, norms, lr = [], [], None
        model.train()
        for _ in range(self.e.epochs):
            order = rng.permutation(n)
            for b in range(0, n, self.e.batch_size):
                rows = order[b:b + self.e.batch_size][rank::world]
                if len(order[b:b + self.e.batch_size]) < world:
                    continue  # every process must take part in each step
                n_tokens = sum(len(examples[i][1]) for i in rows)
                mbs = self.s.micro_batch_size
                rows = sorted(rows, key=lambda i: -(len(examples[i][0]) + len(examples[i][1])))
                chunks = [rows[i:i + mbs] for i in range(0, len(rows), mbs)]
                total = 0.0
                for j, chunk in enumerate(chunks):
                    pi, pm = left_pad([examples[i][0] for i in chunk], self.pad_id)
                    ri, rm = right_pad([examples[i][1] for i in chunk], self.pad_id)
                    mb = Experience(pi, pm, ri, rm).to(self.accel.device)
                    with self.accel.no_sync(model, j == len(chunks) - 1), self.accel.autocast():
                        loss = sft_loss(model, mb, n_tokens)
                        self.accel.backward(loss)
                    total += float(loss.detach())
                lr = sched.get_last_lr()[0]
                norms.append(self.accel.clip(model.parameters(), self.s.grad_clip))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(total)
        self.engine.refresh()
        return {"sft_loss": float(np.mean(losses[-per_epoch:])) if losses else None, "lr": lr,
                "grad_norm": float(np.mean(norms)) if norms else None}

    # one round ------------------------------------------------------------------------------------

    def round(self, round_index: int, prompts: list[list[int]], golds: list[str], prompt_offset: int = 0):
        """Sample, filter, fine-tune; returns the logged row (global) and all processes' records."""
        records, info = self.collect(prompts, golds, prompt_offset)
        everyone = self.accel.gather([{"records": records, "info": info}])
        recs = [r for part in everyone for r in part["records"]]
        keep = keep_verified([r["prompt_index"] for r in recs], [r["response_ids"] for r in recs],
                             [r["reward"] for r in recs])
        examples = [(recs[i]["prompt_ids"], recs[i]["response_ids"]) for i in keep]
        t0 = time.perf_counter()
        sft = self.sft(examples, round_index)
        train_s = time.perf_counter() - t0
        row = {
            **rollout_row(recs, [part["info"] for part in everyone], train_s),
            "kept": len(keep),
            "unique": len({(r["prompt_index"], tuple(r["response_ids"])) for r in recs}),
            **sft,
        }
        return row, recs
