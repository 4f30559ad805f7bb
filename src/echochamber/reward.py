"""The RL reward: find a completion's final answer and decide whether it equals the gold answer.

- ``tinygsm``: the function the completion defines is run isolated; its return value is the answer.
- ``omi1``: the ``<llm-code>`` block is run isolated; the value of its last expression is the answer (or,
  when it has none, the last line the code printed). What the model *wrote* as output or in ``\\boxed{}``
  does not count; whether it agrees with the executed value is recorded as ``consistent``.
- ``text``: the last ``\\boxed{}``; with ``unboxed_counts`` the last number when nothing is boxed.

Equivalence: plain numbers (commas, ``$`` and units allowed) are compared exactly in a fast path, with a
float tolerance when either side has decimals; everything else goes through math-verify, gold first.
All code of a batch runs in one :meth:`SandboxPool.map`; equivalence runs in the calling thread.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

from echochamber.formats import classify, extract_code_block, extract_function, last_boxed, last_number
from echochamber.sandbox import SandboxResult, default_pool

MAX_ANSWER = 500            # characters; longer answers are wrong without being parsed
_MV_TIMEOUT = 3             # seconds for math-verify's own alarm (main thread only)


@dataclass
class Verdict:
    correct: bool
    format: str                   # "tinygsm", "omi1" or "text" (echochamber.formats.classify)
    answer: str | None            # the final answer that was compared, as text
    error: str | None = None      # why there is no answer or it could not be compared; None otherwise
    consistent: bool | None = None  # OMI1: do the written output and \boxed{} agree with the executed value


def gold_from_gsm8k(solution: str) -> str:
    """The gold answer of a GSM8K solution: the number after ``####``, without commas."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution ends with '#### <answer>'; this one has no '####'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


# ------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What one completion needs: code to run (and how), or a textual answer."""
    format: str
    code: str | None = None
    mode: str = "auto"
    answer: str | None = None
    error: str | None = None
    claims: list[str] = field(default_factory=list)       # OMI1: the written output and boxed answer


def _plan(completion: str, unboxed_counts: bool) -> _Plan:
    fmt = classify(completion)
    if fmt == "tinygsm":
        return _Plan(fmt, code=extract_function(completion).source, mode="function")
    if fmt == "omi1":
        block = extract_code_block(completion)
        if block.code is None:
            return _Plan(fmt, error="the <llm-code> block is not closed")
        claims = [c.strip() for c in (block.output, block.boxed) if c and c.strip()]
        return _Plan(fmt, code=block.code, mode="expression", claims=claims)
    answer = last_boxed(completion)
    if answer is None and unboxed_counts:
        answer = last_number(completion)
    return _Plan(fmt, answer=answer, error=None if answer else "no final answer")


def _executed_answer(plan: _Plan, run: SandboxResult) -> tuple[str | None, str | None]:
    """The answer a code run gives, or why it gives none."""
    if not run.ok:
        return None, run.error
    if run.value is not None:
        return run.value, None
    if plan.format == "omi1":                          # no trailing expression: what the code printed
        lines = [line for line in run.stdout.splitlines() if line.strip()]
        if lines:
            return lines[-1].strip(), None
        return None, "the code has no final expression and printed nothing"
    return None, "the function returned None"


def _judge(plan: _Plan, gold: str) -> Verdict:
    answer, error = plan.answer, plan.error
    if answer is None:
        return Verdict(False, plan.format, None, error or "no final answer")
    consistent = None
    if plan.format == "omi1" and plan.claims:
        consistent = all(equivalent(answer, claim) for claim in plan.claims)
    correct, why = compare(gold, answer)
    return Verdict(correct, plan.format, answer, why, consistent)


def score_batch(completions, golds, *, unboxed_counts: bool = True, pool=None,
                timeout: float = 3.0) -> list[Verdict]:
    """Score many completions: all their code in one parallel sandbox batch, then equivalence here."""
    completions, golds = list(completions), [_gold_text(g) for g in golds]
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    plans = [_plan(c, unboxed_counts) for c in completions]
    to_run = [p for p in plans if p.code is not None]
    if to_run:
        runs = (pool or default_pool()).map([p.code for p in to_run], modes=[p.mode for p in to_run],
                                             timeout=timeout)
        for plan, run in zip(to_run, runs):
            plan.answer, plan.error = _executed_answer(plan, run)
    return [_judge(p, g) for p, g in zip(plans, golds)]


def score(completion: str, gold: str, *, unboxed_counts: bool = True, pool=None) -> Verdict:
    """Score one completion against a gold answer (a plain answer, or a GSM8K solution with ``####``)."""
    return score_batch([completion], [gold], unboxed_counts=unboxed_counts, pool=pool)[0]


def _gold_text(gold) -> str:
    gold = str(gold)
    return gold_from_gsm8k(gold) if "####" in gold else gold.strip()


# ------------------------------------------------------------------------------------------------------
# Equivalence
# ------------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NOT_UNITS = {"pi", "e", "i", "sqrt", "log", "ln", "x", "y", "z", "n", "k"}
_PLAIN = re.compile(rf"(?P<number>{_NUMBER})(?P<units>(?:\s+|(?<=\d)(?=[A-Za-z]))[A-Za-z][A-Za-z .]*)?")
_TEXT_CMD = re.compile(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}")
# Powers and factorials whose value no comparison can afford: 10^{10^{10}}, 9^9^9, 2^{100000}, 100000!.
_HUGE = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*[-+]?\d{4,}|\d{4,}\s*!|\^\s*\{[^{}]*(?:\^|\*\*)|\^\s*\d+\s*\^")


def _plain_number(text: str) -> Fraction | None:
    """``18``, ``1,000``, ``$18``, ``18 dollars``, ``\\$1{,}000``, ``2.50``, ``1e+20`` as an exact number."""
    t = _TEXT_CMD.sub(r" \1", text)
    for junk, repl in (("{,}", ","), ("\\$", " "), ("$", " "), ("\\!", ""), ("\\,", ""), ("\\ ", " ")):
        t = t.replace(junk, repl)
    t = t.strip().rstrip(".").strip()
    m = _PLAIN.fullmatch(t)
    if m is None:
        return None
    units = (m.group("units") or "").replace(".", " ").split()
    if any(word.lower() in _NOT_UNITS for word in units):
        return None
    try:
        return Fraction(m.group("number").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _is_integer_text(text: str) -> bool:
    return not re.search(r"[.eE]\d|\d[.eE]", text)


def _numbers_equal(gold: Fraction, answer: Fraction, exact: bool) -> bool:
    """Exact for two integers; otherwise within float noise (1e-6 absolute or 1e-12 relative)."""
    if gold == answer or exact:
        return gold == answer
    return abs(gold - answer) <= max(Fraction(1, 10**6), abs(gold) / 10**12)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse(text: str, timeout: int | None) -> tuple:
    """math-verify's parse, with bare answers wrapped in \\boxed{} so that LaTeX parsing applies."""
    from math_verify import parse

    wrapped = text if ("$" in text or "\\boxed" in text) else f"\\boxed{{{text}}}"
    found = parse(wrapped, parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)
    return tuple(found)


def compare(gold: str, answer: str) -> tuple[bool, str | None]:
    """Whether ``answer`` equals ``gold``, and an error when the answer could not be compared."""
    gold, answer = str(gold).strip(), str(answer).strip()
    g, a = _plain_number(gold), _plain_number(answer)
    if g is not None and a is not None:
        exact = _is_integer_text(gold) and _is_integer_text(answer)
        return _numbers_equal(g, a, exact), None
    if len(answer) > MAX_ANSWER or _HUGE.search(answer):
        return False, "answer too long or too large to compare"
    timeout = _MV_TIMEOUT if _main_thread() else None      # math-verify's alarm needs the main thread
    try:
        parsed_gold, parsed = _parse(gold, timeout), _parse(answer, timeout)
    except Exception as exc:  # a parser bug must not stop training
        return False, f"could not parse: {type(exc).__name__}: {exc}"[:300]
    if not parsed_gold:
        return False, f"could not parse the gold answer {gold[:80]!r}"
    if not parsed:
        return False, f"could not parse the answer {answer[:80]!r}"
    from math_verify import verify

    try:
        correct = bool(verify(list(parsed_gold), list(parsed), timeout_seconds=timeout))
    except Exception as exc:
        return False, f"comparison failed: {type(exc).__name__}: {exc}"[:300]
    if not correct and g is not None and not any(_is_number(p) for p in parsed):
        return False, f"no number in the answer {answer[:80]!r}"   # e.g. 'eighteen' against 18
    return correct, None


def _is_number(expr) -> bool:
    """A parsed expression without free symbols (``eighteen`` parses as a symbol, ``1/2`` does not)."""
    if isinstance(expr, str):
        return False
    expr = getattr(expr, "rhs", expr)                  # x = 6 states the number 6
    return not getattr(expr, "free_symbols", True)


def equivalent(gold: str, answer: str) -> bool:
    """``compare`` without the reason."""
    return compare(gold, answer)[0]
