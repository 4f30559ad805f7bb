"""Evaluate checkpoints on a benchmark: pass@1 (greedy), unbiased pass@k, maj@k, format shares.

For every checkpoint of a cell and one benchmark (a parquet file in the data schema: ``id``, ``question``,
``answer``), the model answers each question once greedily and ``n_samples`` times at the configured
temperature and top-p. A scorer (``echochamber.reward.score_batch`` by default) turns each completion
into a verdict (correct, format, answer, error). Per checkpoint:

- ``pass1``: accuracy of the greedy answers;
- ``pass_k``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` averaged over problems (``c`` correct
  out of ``n`` samples), computed as a product so it never overflows;
- ``maj_k``: majority vote over the extracted answers of ``k`` samples (the ``n // k`` disjoint groups of
  ``k`` consecutive samples, averaged); unparsable answers never win and a tie is broken uniformly at
  random, i.e. counted as the expected value;
- ``mean_acc``: accuracy of all samples (pass@1 at the sampling temperature);
- ``share_<format>`` / ``acc_<format>``: the share of samples in each answer format and the accuracy
  within each (NaN when a format is absent).

Completions and verdicts are kept in ``generations.parquet``. Sampling is seeded per checkpoint with the
same seed, so every checkpoint of a cell sees the same random stream.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ConfigDict

from echochamber import manifest
from echochamber import settings as ec_settings
from echochamber.data.tokenizer import encode_prompt
from echochamber.formats import FORMATS, classify
from echochamber.io import atomic_path, unreadable

METRIC_COLUMNS = ("step", "n_problems", "n_samples", "k", "temperature", "top_p", "pass1", "pass_k", "maj_k",
                  "mean_acc", *(f"share_{f}" for f in FORMATS), *(f"acc_{f}" for f in FORMATS),
                  "unparsable_rate", "response_len", "trunc_rate")
GENERATION_COLUMNS = ("step", "problem_id", "kind", "sample", "question", "gold", "completion", "format",
                      "answer", "correct", "error", "n_tokens", "truncated")

Scorer = Callable[[list[str], list[str]], list]


class EvalError(ValueError):
    """A user-facing evaluation problem (bad checkpoint, benchmark or setting): one sentence naming it."""


class EvalSettings(ec_settings.EvalJob):
    """One evaluation job's settings (defined in echochamber.settings.EvalJob) and its seed."""
    model_config = ConfigDict(frozen=True)
    seed: int = 0

    def __init__(self, **kw):
        super().__init__(**kw)
        if not 1 <= self.k <= self.n_samples:
            raise EvalError(f"eval.k ({self.k}) must be between 1 and eval.n_samples ({self.n_samples})")


# ------------------------------------------------------------------------------------------ config


CHECKPOINT_CHOICES = typing.get_args(ec_settings.Benchmark.model_fields["checkpoints"].annotation)  # all, last


def section(config: dict) -> ec_settings.Eval:
    return ec_settings.Eval.model_validate(config.get("eval", {}))


def benchmarks(config: dict) -> dict[str, dict]:
    """Benchmark name -> {source, split, checkpoints} (split defaults to test; checkpoints to ``all``:
    every RL checkpoint, or ``last``: only each RL cell's final one; the base model is always step 0)."""
    return {name: b.model_dump() for name, b in section(config).benchmarks.items()}


def settings_from_config(config: dict, seed: int = 0) -> dict:
    """Only the identity eval values a job uses, as a plain dict (rule params); ``seed`` is the cell's seed.
    The runtime ``keep_samples`` travels apart (:func:`keep_samples`)."""
    out = {k: v for k, v in ec_settings.identity(section(config)).items() if k in ec_settings.EvalJob.model_fields}
    out["seed"] = int(config.get("seed", 0)) * 1000 + int(seed)
    return out


def keep_samples(config: dict) -> int:
    """Sampled generations kept per problem (``eval.keep_samples``, null: all): runtime, a rule resource."""
    ev = section(config)
    return ev.n_samples if ev.keep_samples is None else min(ev.n_samples, ev.keep_samples)


def check_config(config: dict) -> None:
    """Cross-field checks the models cannot express (raises EvalError with one sentence)."""
    ev = section(config)
    n, k = ev.n_samples, ev.k
    if k > n:
        raise EvalError(f"eval.k ({k}) must not exceed eval.n_samples ({n})")


# ------------------------------------------------------------------------------------------ metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms the huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_NUMERIC = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalize_answer(answer) -> str | None:
    """The key answers are voted under: numbers in one spelling (``12``, ``12.0``, ``1,200``), else the
    stripped text; ``None`` for a missing or empty answer (which never wins a vote)."""
    if answer is None:
        return None
    if isinstance(answer, float) and math.isnan(answer):
        return None
    s = str(answer).strip().replace(",", "").replace("$", "")
    if not s:
        return None
    if _NUMERIC.match(s):
        x = float(s)
        if math.isfinite(x):
            return str(int(x)) if x == int(x) else repr(x)
    return " ".join(str(answer).split())


def majority_vote(answers: Sequence, correct: Sequence[bool]) -> float:
    """Correctness of the majority answer of one group of samples, as an expected value over ties.

    Unparsable answers (None) never win; if nothing parses the vote is wrong (0).
    """
    keys = [normalize_answer(a) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [a for a, v in votes.items() if v == top]
    right = {k for k, ok in zip(keys, correct) if k is not None and ok}
    return sum(w in right for w in winners) / len(winners)


def maj_at_k(answers: Sequence, correct: Sequence[bool], k: int) -> float:
    """maj@k from ``n >= k`` samples: the majority vote of each of the ``n // k`` disjoint groups of ``k``
    consecutive samples, averaged (with ``n == k``: one vote over all samples)."""
    n = len(answers)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs 1 <= k <= n and one verdict per answer, got n={n}, k={k}")
    groups = n // k
    return sum(majority_vote(answers[g * k:(g + 1) * k], correct[g * k:(g + 1) * k])
               for g in range(groups)) / groups


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(greedy: Sequence[dict], samples: Sequence[Sequence[dict]], k: int) -> dict:
    """Metrics of one checkpoint from verdict records (``correct``, ``format``, ``answer``, ``n_tokens``,
    ``truncated``): ``greedy`` has one per problem, ``samples`` a list of ``n`` per problem."""
    if not greedy or len(greedy) != len(samples):
        raise ValueError("summarize needs one greedy record and one list of samples per problem")
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError("every problem needs the same number of samples")
    flat = [r for s in samples for r in s]
    out = {
        "n_problems": len(greedy),
        "n_samples": n,
        "k": k,
        "pass1": _mean(bool(r["correct"]) for r in greedy),
        "pass_k": _mean(pass_at_k(n, sum(bool(r["correct"]) for r in s), k) for s in samples),
        "maj_k": _mean(maj_at_k([r["answer"] for r in s], [bool(r["correct"]) for r in s], k) for s in samples),
        "mean_acc": _mean(bool(r["correct"]) for r in flat),
    }
    for f in FORMATS:
        mine = [r for r in flat if r["format"] == f]
        out[f"share_{f}"] = len(mine) / len(flat)
        out[f"acc_{f}"] = _mean(bool(r["correct"]) for r in mine)
    out["unparsable_rate"] = _mean(normalize_answer(r["answer"]) is None for r in flat)
    out["response_len"] = _mean(r.get("n_tokens", 0) for r in flat)
    out["trunc_rate"] = _mean(bool(r.get("truncated", False)) for r in flat)
    return out


# ------------------------------------------------------------------------------------------ inputs


def load_benchmark(path: str | os.PathLike, max_problems: int | None = None):
    """The benchmark's problems (id, question, answer) as a DataFrame, the first ``max_problems`` rows."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise EvalError(f"benchmark file {path} does not exist; run the data stage (rule source) first")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise EvalError(unreadable("benchmark file", path, e)) from None
    missing = [c for c in ("id", "question", "answer") if c not in table.column_names]
    if missing:
        raise EvalError(f"benchmark file {path} lacks the column(s) {', '.join(missing)} of the data schema")
    df = table.select(["id", "question", "answer"]).to_pandas()
    if max_problems is not None:
        df = df.head(max_problems)
    if df.empty:
        raise EvalError(f"benchmark file {path} has no problems")
    return df.reset_index(drop=True)


def find_checkpoints(rl_dir: str | os.PathLike, skip_steps: Sequence[int] = (0,),
                     which: str = "all") -> dict[int, Path]:
    """``step -> folder`` of the steps an RL cell's ``checkpoints/manifest.json`` lists, in step order
    (``which="last"``: only the last step's), each verified against it (sizes and checksums).

    Step 0 is skipped by default: it is the pretrained model, evaluated once as the ``algo=base`` cell.
    The manifest, not the ``step=T/`` folders that happen to exist, says which steps there are: a
    missing step stops the evaluation instead of shortening its curve.
    """
    if which not in CHECKPOINT_CHOICES:
        raise EvalError(f"eval.benchmarks.*.checkpoints: {which!r} is not one of {', '.join(CHECKPOINT_CHOICES)}")
    root = Path(rl_dir) / "checkpoints"
    try:
        listed = [s for s in manifest.steps(root) if s not in skip_steps]
        if not listed:
            raise EvalError(f"no checkpoints to evaluate under {root} (its manifest lists no step but 0)")
        return manifest.verify_set(root, [max(listed)] if which == "last" else listed)
    except manifest.ManifestError as e:
        raise EvalError(str(e)) from None


def base_checkpoint(model_dir: str | os.PathLike) -> dict[int, Path]:
    """``{0: folder}`` of a pretrained model (the ``algo=base`` cell), verified against its manifest."""
    try:
        return {0: manifest.verify(model_dir)}
    except manifest.ManifestError as e:
        raise EvalError(str(e)) from None


def load_checkpoint(path: str | os.PathLike):
    """(model, tokenizer) of a saved checkpoint; one clear sentence when it cannot be loaded."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"checkpoint {path} does not exist; rerun the rule that writes it")
    try:
        from echochamber import models
    except ImportError:
        models = None
    try:
        if models is not None:
            model, tok = models.load_checkpoint(path)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a corrupt or partial checkpoint shows up as many error types
        if models is not None and isinstance(e, models.CheckpointError):
            raise EvalError(f"{e}; delete it and rerun the rule that writes it") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {msg}); "
                        f"delete it and rerun the rule that writes it") from None
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise EvalError(f"the tokenizer saved with checkpoint {path} has no EOS or pad token")
    return model, tok


def default_scorer() -> Scorer:
    try:
        from echochamber.reward import score_batch
    except ImportError as e:
        raise EvalError(f"the reward module echochamber.reward cannot be imported ({e})") from None
    return score_batch


# ------------------------------------------------------------------------------------------ generation



def generate(model, tokenizer, prompts: list[list[int]], *, greedy: bool, settings: EvalSettings,
             generator=None) -> list[tuple[str, int, bool]]:
    """(completion text, tokens generated, truncated) per prompt, with the rollout engine."""
    from echochamber.rollout import RolloutEngine, SamplingParams

    engine = RolloutEngine(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, greedy=greedy)
    batch = engine.generate(prompts, params, generator=generator, batch_size=settings.batch_size)
    out = []
    for ids, mask, trunc in zip(batch.response_ids.tolist(), batch.response_mask.tolist(),
                                batch.truncated.tolist()):
        toks = [t for t, m in zip(ids, mask) if m]
        n = len(toks)
        if toks and toks[-1] == tokenizer.eos_token_id:
            toks = toks[:-1]
        out.append((tokenizer.decode(toks, skip_special_tokens=True), n, bool(trunc)))
    return out


def _verdicts(completions: list[str], golds: list[str], scorer: Scorer) -> list[dict]:
    verdicts = scorer(completions, golds)
    if len(verdicts) != len(completions):
        raise RuntimeError(f"the scorer returned {len(verdicts)} verdicts for {len(completions)} completions")
    out = []
    for text, v in zip(completions, verdicts):
        fmt = getattr(v, "format", None)
        answer = getattr(v, "answer", None)
        out.append({"correct": bool(getattr(v, "correct", False)),
                    "format": fmt if fmt in FORMATS else classify(text),
                    "answer": None if answer is None else str(answer),
                    "error": getattr(v, "error", None)})
    return out


def evaluate_model(model, tokenizer, problems, settings: EvalSettings, scorer: Scorer | None = None):
    """Metrics dict and generation rows of one model on the problems (DataFrame: id, question, answer)."""
    import torch

    scorer = scorer or default_scorer()
    questions, golds = list(problems["question"]), [str(a) for a in problems["answer"]]
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    n = settings.n_samples

    greedy_out = generate(model, tokenizer, prompts, greedy=True, settings=settings)
    sample_out = generate(model, tokenizer, [p for p in prompts for _ in range(n)], greedy=False,
                          settings=settings, generator=gen)
    greedy_v = _verdicts([t for t, _, _ in greedy_out], golds, scorer)
    sample_v = _verdicts([t for t, _, _ in sample_out], [g for g in golds for _ in range(n)], scorer)
    for recs, outs in ((greedy_v, greedy_out), (sample_v, sample_out)):
        for r, (text, n_tok, trunc) in zip(recs, outs):
            r.update(completion=text, n_tokens=n_tok, truncated=trunc)
    per_problem = [sample_v[i * n:(i + 1) * n] for i in range(len(questions))]
    metrics = summarize(greedy_v, per_problem, settings.k)
    metrics.update(temperature=settings.temperature, top_p=settings.top_p)

    keep = n if settings.keep_samples is None else min(n, settings.keep_samples)
    rows = []
    for i, (pid, q, gold) in enumerate(zip(problems["id"], questions, golds)):
        recs = [("greedy", 0, greedy_v[i])] + [("sample", j, per_problem[i][j]) for j in range(keep)]
        for kind, j, r in recs:
            rows.append({"problem_id": str(pid), "kind": kind, "sample": j, "question": q, "gold": gold,
                         **{c: r[c] for c in ("completion", "format", "answer", "correct", "error",
                                              "n_tokens", "truncated")}})
    return metrics, rows


def _write(rows: list[dict], columns: Sequence[str], path: str | os.PathLike, types: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, types.get(c, pa.float64())) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _types():
    import pyarrow as pa

    ints = {c: pa.int32() for c in ("step", "n_problems", "n_samples", "k", "sample", "n_tokens")}
    strs = {c: pa.string() for c in ("problem_id", "kind", "question", "gold", "completion", "format",
                                     "answer", "error")}
    return {**ints, **strs, "correct": pa.bool_(), "truncated": pa.bool_()}


def evaluate_checkpoints(checkpoints: dict[int, str | os.PathLike], benchmark_file: str | os.PathLike,
                         settings: EvalSettings | dict, metrics_out: str | os.PathLike,
                         generations_out: str | os.PathLike, *, scorer: Scorer | None = None,
                         loader: Callable | None = None, log=None, device: str | None = None) -> list[dict]:
    """Evaluate each ``step -> checkpoint folder`` on one benchmark; write metrics and generations.

    Both files are written atomically once every checkpoint is done; returns the metric rows.
    """
    import torch

    if isinstance(settings, dict):
        settings = EvalSettings(**settings)
    scorer = scorer or default_scorer()
    loader = loader or load_checkpoint
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    problems = load_benchmark(benchmark_file, settings.max_problems)
    metrics_rows, gen_rows = [], []
    for step, path in sorted(checkpoints.items()):
        model, tok = loader(path)
        model.to(device)
        metrics, rows = evaluate_model(model, tok, problems, settings, scorer)
        metrics_rows.append({"step": int(step), **metrics})
        gen_rows.extend({"step": int(step), **r} for r in rows)
        if log:
            log.info("step %d: pass@1 %.3f pass@%d %.3f maj@%d %.3f shares %s", step, metrics["pass1"],
                     settings.k, metrics["pass_k"], settings.k, metrics["maj_k"],
                     " ".join(f"{f}={metrics[f'share_{f}']:.2f}" for f in FORMATS))
        del model
    types = _types()
    _write(gen_rows, GENERATION_COLUMNS, generations_out, types)
    _write(metrics_rows, METRIC_COLUMNS, metrics_out, types)
    return metrics_rows
