"""A built-in synthetic math world: GSM8K-like word problems rendered in the study's three formats.

Each problem is a chain of steps over one quantity (start, then + - x and exact division), with an
integer gold answer. The renderers mirror the real datasets' shapes:

- ``tinygsm``: ``def simple_math_problem() -> int:`` with the question as docstring, named variables,
  ``result = ...`` / ``return result`` (the interpreter does the arithmetic);
- ``omi1``: a sentence, a ``<llm-code>`` block whose last line is an expression, ``<llm-code-output>``,
  then ``\\boxed{}`` (the interpreter does the arithmetic);
- ``omi2``: step-by-step prose with every operation written out, ending in ``\\boxed{}`` (the model
  must do the arithmetic itself, which is what makes formats differ in accuracy for a small model).

Two general corpora stand in for FineMath (arithmetic prose) and Algebraic-Stack (small Python
programs), and ``gsm8k`` renders problems in GSM8K's own answer style (``#### answer``) for RL prompts
and evaluation. Everything is seeded: the same (seed, source, split) gives the same rows. A source may carry
``errors``: a share of its train solutions with one number copied wrong, as in generated data nobody checked
(TinyGSM's GPT-3.5 solutions were not verified; OMI1's were filtered to correct answers).
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

# One schema shared with the real-dataset loaders.
SCHEMA = pa.schema([
    ("source", pa.string()),
    ("id", pa.string()),
    ("question", pa.string()),
    ("solution", pa.string()),
    ("answer", pa.string()),
    ("split", pa.string()),
    ("difficulty", pa.int32()),
])

SPLITS = ("train", "test", "hard")
RENDERS = ("tinygsm", "omi1", "omi2", "gsm8k", "prose_corpus", "code_corpus")

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe"]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "shells",
           "cards", "eggs", "stamps", "beads", "toys", "cupcakes", "flowers", "rocks"]


@dataclass(frozen=True)
class Difficulty:
    """How hard a split's problems are: number of steps and sizes of the numbers."""
    min_steps: int = 1
    max_steps: int = 3
    max_start: int = 40
    max_addend: int = 30
    max_factor: int = 9
    max_value: int = 999


@dataclass
class Step:
    op: str              # add | sub | mul | div | sell
    operand: int
    value: int           # running value after the step
    sentence: str        # the sentence of the question
    operand_var: str     # variable holding the operand in code
    result_var: str      # variable holding the value after the step in code
    prose: str           # how the step reads in a prose solution, with {expr} for the arithmetic


@dataclass
class Problem:
    id: str
    name: str
    obj: str
    start: int
    steps: list[Step] = field(default_factory=list)
    question: str = ""
    answer: int = 0


_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "//", "sell": "*"}
_PROSE_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "sell": "*"}


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(zlib.crc32("/".join([str(seed), *parts]).encode()))


def _unique(var: str, used: set[str]) -> str:
    name, k = var, 2
    while name in used:
        name, k = f"{var}_{k}", k + 1
    used.add(name)
    return name


def _step(rng: random.Random, value: int, name: str, obj: str, diff: Difficulty, last: bool, used: set[str]):
    """Pick one operation that keeps the value a positive integer within range."""
    ops = ["add", "sub", "mul", "div"] + (["sell"] if last else [])
    rng.shuffle(ops)
    friend = rng.choice([n for n in NAMES if n != name])
    for op in ops:
        if op == "add":
            b = rng.randint(2, diff.max_addend)
            if value + b > diff.max_value:
                continue
            return op, b, value + b, f"Then {name} gets {b} more {obj}.", "more", "after_getting", \
                f"After getting {b} more, {name} has {{expr}} {obj}."
        if op == "sub":
            if value < 3:
                continue
            b = rng.randint(1, min(diff.max_addend, value - 1))
            return op, b, value - b, f"{name} gives {b} {obj} to {friend}.", "given", "after_giving", \
                f"After giving {b} to {friend}, {name} has {{expr}} {obj}."
        if op == "mul":
            b = rng.randint(2, diff.max_factor)
            if value * b > diff.max_value:
                continue
            return op, b, value * b, f"Then the number of {obj} {name} has grows {b} times.", "factor", \
                "after_growing", f"Growing {b} times gives {{expr}} {obj}."
        if op == "div":
            divisors = [d for d in range(2, diff.max_factor + 1) if value % d == 0]
            if not divisors:
                continue
            b = rng.choice(divisors)
            return op, b, value // b, f"{name} splits the {obj} into {b} equal groups and keeps one group.", \
                "groups", "one_group", f"Splitting into {b} equal groups leaves {{expr}} {obj}."
        if op == "sell":
            b = rng.randint(2, diff.max_factor)
            if value * b > diff.max_value:
                continue
            return op, b, value * b, f"{name} sells each of the {obj} for ${b}.", "price", "earnings", \
                f"Selling them at ${b} each makes {{expr}} dollars."
    raise AssertionError("no operation fits")  # add always fits for small values; see Difficulty


def make_problem(rng: random.Random, pid: str, diff: Difficulty) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    start = rng.randint(2, diff.max_start)
    n_steps = rng.randint(diff.min_steps, diff.max_steps)
    used = {obj}
    p = Problem(id=pid, name=name, obj=obj, start=start)
    value = start
    for i in range(n_steps):
        op, b, value, sentence, ov, rv, prose = _step(rng, value, name, obj, diff, i == n_steps - 1, used)
        p.steps.append(Step(op, b, value, sentence, _unique(ov, used), _unique(rv, used), prose))
    sold = p.steps[-1].op == "sell"
    tail = f"How many dollars does {name} make?" if sold else f"How many {obj} does {name} have now?"
    p.question = " ".join([f"{name} has {start} {obj}."] + [s.sentence for s in p.steps] + [tail])
    p.answer = value
    return p


# --- renderers ---------------------------------------------------------------------------------

def _code_lines(p: Problem) -> list[str]:
    lines, current = [f"{p.obj} = {p.start}"], p.obj
    for s in p.steps:
        lines.append(f"{s.operand_var} = {s.operand}")
        lines.append(f"{s.result_var} = {current} {_SYMBOL[s.op]} {s.operand_var}")
        current = s.result_var
    return lines


def render_tinygsm(p: Problem) -> str:
    body = _code_lines(p)
    last = body[-1].split(" = ")[0]
    lines = ["def simple_math_problem() -> int:", '    """', f"    {p.question}", '    """']
    lines += [f"    {line}" for line in body]
    lines += [f"    result = {last}", "    return result"]
    return "\n".join(lines)


def render_omi1(p: Problem) -> str:
    body = _code_lines(p)
    last = body[-1].split(" = ")[0]
    unit = "dollars" if p.steps[-1].op == "sell" else p.obj
    return "\n".join([
        "Let's solve this problem using Python code.",
        "<llm-code>", *body, last, "</llm-code>",
        "<llm-code-output>", str(p.answer), "</llm-code-output>",
        f"Thus {p.name} ends up with \\boxed{{{p.answer}}} {unit}.",
    ])


def _prose_steps(p: Problem) -> list[str]:
    lines, value = [f"{p.name} starts with {p.start} {p.obj}."], p.start
    for s in p.steps:
        lines.append(s.prose.format(expr=f"{value} {_PROSE_SYMBOL[s.op]} {s.operand} = {s.value}"))
        value = s.value
    return lines


# Every format announces itself in its first tokens, as in the real datasets (TinyGSM's `def`, OMI1's
# "Let's solve this problem using Python code."). Without an opening of its own, prose would begin with
# the problem's name (24 of them), its first-token mass spread thin: sampling at temperature 0.7 sharpens
# that away, and the base model would write prose far less often than the mixture holds it.
PROSE_OPENER = "We work it out step by step."


def render_omi2(p: Problem) -> str:
    return "\n".join([PROSE_OPENER, *_prose_steps(p), f"So the answer is \\boxed{{{p.answer}}}."])


def render_gsm8k(p: Problem) -> str:
    lines, value = [], p.start
    for s in p.steps:
        sym = _PROSE_SYMBOL[s.op]
        lines.append(f"{value} {sym} {s.operand} = <<{value}{sym}{s.operand}={s.value}>>{s.value}")
        value = s.value
    return "\n".join(lines + [f"#### {p.answer}"])


RENDERERS = {"tinygsm": render_tinygsm, "omi1": render_omi1, "omi2": render_omi2, "gsm8k": render_gsm8k}


def with_a_wrong_number(p: Problem, rng: random.Random) -> Problem | None:
    """``p`` as an unchecked generator might solve it: one step's number copied wrong (off by 1 to 9) and the
    values after it, answer included, recomputed from it; the question is kept (``generate`` keeps the gold
    answer in its row). None when every step divides (a wrong divisor need not divide)."""
    k = [i for i, s in enumerate(p.steps) if s.op != "div"]
    if not k:
        return None
    i = rng.choice(k)
    steps, value = [], p.start
    for j, s in enumerate(p.steps):
        operand = s.operand
        if j == i:
            operand += rng.choice([d for d in range(-9, 10) if d and operand + d >= 1])
        value = {"add": value + operand, "sub": value - operand, "mul": value * operand, "sell": value * operand,
                 "div": value // operand}[s.op]
        steps.append(dataclasses.replace(s, operand=operand, value=value))
    return dataclasses.replace(p, steps=steps, answer=value)


# --- general corpora ---------------------------------------------------------------------------

def _fact(rng: random.Random) -> str:
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    kind = rng.randrange(6)
    if kind == 0:
        return f"The sum of {a} and {b} is {a + b}."
    if kind == 1:
        return f"If we take {b} away from {a + b}, we are left with {a}."
    if kind == 2:
        a, b = rng.randint(2, 40), rng.randint(2, 9)
        return f"{a} times {b} is {a * b}, because {a} * {b} = {a * b}."
    if kind == 3:
        a, b = rng.randint(2, 40), rng.randint(2, 9)
        return f"Dividing {a * b} into {b} equal parts gives {a} in each part: {a * b} / {b} = {a}."
    if kind == 4:
        return f"We can check that {a} + {b} = {a + b} by counting on from {a}."
    return f"Subtracting gives {a + b} - {b} = {a}."


TOPICS = ["addition", "subtraction", "multiplication", "division", "mental arithmetic", "word problems"]


def render_prose_corpus(rng: random.Random) -> tuple[str, str]:
    """A FineMath-like page: a heading and a few paragraphs of worked arithmetic in prose."""
    title = f"# Notes on {rng.choice(TOPICS)}"
    paragraphs = [" ".join(_fact(rng) for _ in range(rng.randint(2, 4))) for _ in range(rng.randint(1, 3))]
    return title, "\n\n".join(paragraphs)


_CODE_FUNCS = [
    ("total", "a, b", "a + b"), ("difference", "a, b", "a - b"), ("product", "a, b", "a * b"),
    ("area", "width, height", "width * height"), ("perimeter", "width, height", "2 * (width + height)"),
    ("share", "total, people", "total // people"),
]


def render_code_corpus(rng: random.Random) -> tuple[str, str]:
    """An Algebraic-Stack-like file: a small Python module with a function and its use."""
    name, args, expr = rng.choice(_CODE_FUNCS)
    names = [a.strip() for a in args.split(",")]
    values = [rng.randint(2, 30) for _ in names]
    env = dict(zip(names, values))
    value = eval(expr, {}, env)  # our own fixed expressions, not model output
    lines = [f"def {name}({args}):", f"    return {expr}", ""]
    lines += [f"{n} = {v}" for n, v in zip(["x", "y"], values)]
    lines.append(f"print({name}({', '.join(['x', 'y'][:len(values)])}))  # {value}")
    return f"# file: {name}.py", "\n".join(lines)


CORPORA = {"prose_corpus": render_prose_corpus, "code_corpus": render_code_corpus}


# --- splits ------------------------------------------------------------------------------------

def generate(source: str, render: str, split: str, n: int, *, seed: int,
             difficulty: Difficulty, exclude: set[str] | None = None, errors: float = 0.0) -> list[dict]:
    """``n`` rows of one source and split, as dicts in ``SCHEMA``'s column order.

    ``exclude`` holds questions to skip (for example the train questions when making test). ``errors``: the
    share of solutions written :func:`with_a_wrong_number` (drawn from a stream of its own, so the problems
    and every other solution are those of ``errors=0``); the ``answer`` column stays the gold answer.
    """
    if render not in RENDERS:
        raise ValueError(f"unknown render {render!r}; allowed: {', '.join(RENDERS)}")
    rng, mistakes = _rng(seed, source, split), _rng(seed, source, split, "errors")
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        pid = f"{source}-{split}-{len(rows)}"
        if render in CORPORA:
            question, solution = CORPORA[render](rng)
            answer, level = "", 0
        else:
            p = make_problem(rng, pid, difficulty)
            if p.question in seen:
                continue
            seen.add(p.question)
            written = p
            if errors and mistakes.random() < errors:
                written = with_a_wrong_number(p, mistakes) or p
            question, solution, answer, level = p.question, RENDERERS[render](written), str(p.answer), len(p.steps)
        rows.append({"source": source, "id": pid, "question": question, "solution": solution,
                     "answer": answer, "split": split, "difficulty": level})
    return rows


def write_parquet(rows: list[dict], path) -> None:
    """Write rows in the shared schema; identical rows give byte-identical files."""
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
