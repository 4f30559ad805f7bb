"""The synthetic math world: every rendered solution is correct, splits are seeded and distinct."""

import hashlib
import re

import pyarrow.parquet as pq
import pytest

from echochamber import formats
from echochamber.data import synthetic
from echochamber.data.sources import synthetic_splits

EASY = synthetic.Difficulty()
HARD = synthetic.Difficulty(min_steps=4, max_steps=5, max_start=90, max_addend=60, max_value=1999)


def rows(render, n=300, split="train", difficulty=EASY):
    return synthetic.generate("s", render, split, n, seed=7, difficulty=difficulty)


def _returns(solution: str) -> int:
    """What a TinyGSM solution's function returns (our own generated code)."""
    fn = formats.extract_function(solution)
    env = {}
    exec(fn.source, env)
    return env[fn.name]()


@pytest.mark.parametrize("difficulty", [EASY, HARD])
def test_every_tinygsm_function_returns_the_gold(difficulty):
    for row in rows("tinygsm", difficulty=difficulty):
        assert formats.extract_function(row["solution"]).name == "simple_math_problem"
        assert row["solution"].startswith("def simple_math_problem() -> int:\n    \"\"\"")
        assert row["question"] in row["solution"]  # the docstring restates the question
        assert _returns(row["solution"]) == int(row["answer"])
        assert formats.classify(row["solution"]) == "tinygsm"


@pytest.mark.parametrize("difficulty", [EASY, HARD])
def test_every_omi1_block_evaluates_to_the_gold_and_is_boxed(difficulty):
    for row in rows("omi1", difficulty=difficulty):
        block = formats.extract_code_block(row["solution"])
        *body, last = block.code.strip().split("\n")
        env = {}
        exec("\n".join(body), env)
        assert eval(last, env) == int(row["answer"])  # the last line is an expression
        assert block.output.strip() == row["answer"] == block.boxed
        assert formats.classify(row["solution"]) == "omi1"


@pytest.mark.parametrize("difficulty", [EASY, HARD])
def test_every_omi2_solution_has_correct_arithmetic_and_box(difficulty):
    for row in rows("omi2", difficulty=difficulty):
        text = row["solution"]
        assert formats.last_boxed(text) == row["answer"]
        assert formats.classify(text) == "text"
        ops = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text)
        assert len(ops) == row["difficulty"]  # every step is written out, and each is right
        for a, op, b, result in ops:
            assert eval(f"{a} {'//' if op == '/' else op} {b}") == int(result)


def test_each_format_opens_with_a_first_line_of_its_own():
    # the format is chosen in the first tokens, as in the real data: one opening line per format,
    # shared by all its solutions and by no other format
    firsts = {r: {row["solution"].split("\n", 1)[0] for row in rows(r, n=100)} for r in ("tinygsm", "omi1", "omi2")}
    assert all(len(lines) == 1 for lines in firsts.values()), firsts
    assert len(set.union(*firsts.values())) == 3


def test_gsm8k_render_has_gold_after_hashes():
    for row in rows("gsm8k", n=50):
        assert row["solution"].rsplit("#### ", 1)[1] == row["answer"]


def test_difficulty_levels_differ():
    easy = rows("tinygsm", difficulty=EASY)
    hard = rows("tinygsm", difficulty=HARD)
    assert max(r["difficulty"] for r in easy) <= 3
    assert min(r["difficulty"] for r in hard) >= 4


def test_problems_use_all_operations_and_integer_answers():
    ops = set()
    for row in rows("tinygsm", n=400):
        assert int(row["answer"]) >= 0
        ops |= {op for op in ("+", "-", "*", "//") if f" {op} " in row["solution"]}
    assert ops == {"+", "-", "*", "//"}


def test_corpora_have_their_shape():
    prose = rows("prose_corpus", n=50)
    code = rows("code_corpus", n=50)
    assert all(formats.classify(formats.document(r["question"], r["solution"])) == "text" for r in prose)
    for r in code:
        env = {}
        src = r["solution"].replace("print(", "value = (")
        exec(src, env)
        assert str(env["value"]) == r["solution"].rsplit("# ", 1)[1]


SPEC = {"kind": "synthetic", "render": "tinygsm", "n_train": 200, "n_test": 50, "n_hard": 50,
        "difficulty": {}, "hard": {"min_steps": 4, "max_steps": 5}, "seed": 3}


def test_test_and_hard_splits_do_not_repeat_train_questions():
    splits = synthetic_splits("tg", SPEC)
    train = {r["question"] for r in splits["train"]}
    assert not train & {r["question"] for r in splits["test"] + splits["hard"]}
    assert len({r["id"] for r in splits["train"]}) == 200


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_parquet(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    synthetic.write_parquet(synthetic_splits("tg", SPEC)["train"], a)
    synthetic.write_parquet(synthetic_splits("tg", SPEC)["train"], b)
    synthetic.write_parquet(synthetic_splits("tg", dict(SPEC, seed=4))["train"], c)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert pq.read_schema(a).names == ["source", "id", "question", "solution", "answer", "split", "difficulty"]


def test_unchecked_solutions_copy_one_number_wrong_and_leave_the_rest_as_they_were():
    """``errors``: a share of the train solutions computes a wrong answer (one number off by 1-9, the question
    and the gold kept), drawn from its own stream: every other row is byte for byte that of ``errors=0``."""
    clean = rows("tinygsm", n=1000)
    noisy = synthetic.generate("s", "tinygsm", "train", 1000, seed=7, difficulty=EASY, errors=0.3)
    assert [r["question"] for r in noisy] == [r["question"] for r in clean]
    assert [r["answer"] for r in noisy] == [r["answer"] for r in clean]
    changed = [(c, n) for c, n in zip(clean, noisy) if c["solution"] != n["solution"]]
    assert 0.25 < len(changed) / len(clean) < 0.35
    for c, n in changed:
        assert _returns(n["solution"]) != int(n["answer"]) or "//" in n["solution"]   # a quotient may still agree
        diff = [(a, b) for a, b in zip(c["solution"].splitlines(), n["solution"].splitlines()) if a != b]
        assert len(diff) == 1 and re.fullmatch(r"\s+\w+ = \d+", diff[0][1])       # one number, in one line
        assert n["question"] in n["solution"]                                     # the docstring is the question
    wrong = sum(_returns(n["solution"]) != int(n["answer"]) for _, n in changed)
    assert wrong / len(changed) > 0.9
    omi1 = synthetic.generate("s", "omi1", "train", 200, seed=7, difficulty=EASY, errors=1.0)
    assert all(r["solution"].splitlines()[-1].startswith("Thus") for r in omi1)  # every format can carry them


def test_a_source_setting_errors_reaches_its_train_split_only():
    spec = {"kind": "synthetic", "render": "tinygsm", "n_train": 200, "n_test": 50, "n_hard": 50, "seed": 3,
            "difficulty": EASY.__dict__, "hard": HARD.__dict__}
    clean, noisy = synthetic_splits("tg", spec), synthetic_splits("tg", {**spec, "errors": 0.5})
    assert noisy["test"] == clean["test"] and noisy["hard"] == clean["hard"]
    assert sum(a != b for a, b in zip(clean["train"], noisy["train"])) > 50
