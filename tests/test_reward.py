"""The reward: the paper's verifier cases on GSM8K's first test question, and answer equivalence."""

import threading

import pytest

from echochamber.reward import Verdict, compare, gold_from_gsm8k, score, score_batch
from echochamber.sandbox import SandboxPool

QUESTION = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
            "muffins for her friends every day with four. She sells the remainder at the farmers' market "
            "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
            "market?")
GOLD_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                 "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18")

TINYGSM = f'''def simple_math_problem() -> int:
    """
    {QUESTION}
    """
    eggs_per_day = 16
    eaten_for_breakfast = 3
    used_for_muffins = 4
    remainder = eggs_per_day - eaten_for_breakfast - used_for_muffins
    price_per_egg = 2
    result = remainder * price_per_egg
    return result
'''
TINYGSM_WRONG = TINYGSM.replace("remainder * price_per_egg", "eggs_per_day * price_per_egg * 3")
OMI1_WRITES_96 = """Let's compute how many eggs are left and multiply by the price.
<llm-code>
eggs_left = 16 - 3 - 4
money = eggs_left * 2
money
</llm-code>
<llm-code-output>
96
</llm-code-output>
So Janet makes \\boxed{96} dollars every day."""
TEXT_18 = ("Janet has 16 - 3 - 4 = 9 eggs left to sell. At $2 each she makes 9 * 2 = 18 dollars.\n"
           "The answer is \\boxed{18}.")
TEXT_6 = "She has 16 - 3 - 4 = 3 eggs left. So she makes 3 * 2 = \\boxed{6} dollars."
DEFINE_PROSE = "We define x as the number of eggs left: x = 16 - 3 - 4 = 9, so she makes \\boxed{18}."


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


# ---------------------------------------------------------------------------------------------------
# The paper's verifier cases
# ---------------------------------------------------------------------------------------------------

def test_correct_tinygsm_function(pool):
    assert score(TINYGSM, "18", pool=pool) == Verdict(True, "tinygsm", "18", None, None)


def test_tinygsm_function_that_computes_something_else(pool):
    verdict = score(TINYGSM_WRONG, "18", pool=pool)
    assert (verdict.correct, verdict.format, verdict.answer) == (False, "tinygsm", "96")


def test_omi1_executed_value_counts_not_the_written_output(pool):
    verdict = score(OMI1_WRITES_96, "18", pool=pool)
    assert (verdict.correct, verdict.format, verdict.answer) == (True, "omi1", "18")
    assert verdict.consistent is False


def test_consistent_omi1(pool):
    text = OMI1_WRITES_96.replace("96", "18")
    assert score(text, "18", pool=pool) == Verdict(True, "omi1", "18", None, True)


def test_boxed_prose():
    assert score(TEXT_18, "18") == Verdict(True, "text", "18", None, None)
    assert score(TEXT_6, "18") == Verdict(False, "text", "6", None, None)


def test_prose_that_says_define_is_text():
    assert score(DEFINE_PROSE, "18") == Verdict(True, "text", "18", None, None)


def test_gsm8k_solution_as_gold(pool):
    assert gold_from_gsm8k(GOLD_SOLUTION) == "18"
    assert gold_from_gsm8k("...\n#### 1,000") == "1000"
    assert score(TINYGSM, GOLD_SOLUTION, pool=pool).correct
    with pytest.raises(ValueError):
        gold_from_gsm8k("no marker here")


# ---------------------------------------------------------------------------------------------------
# Answer extraction details
# ---------------------------------------------------------------------------------------------------

def test_unboxed_final_number():
    prose = "She has 9 eggs and sells them for 2 dollars each, so 18"
    assert score(prose, "18").correct
    verdict = score(prose, "18", unboxed_counts=False)
    assert (verdict.correct, verdict.answer, verdict.error) == (False, None, "no final answer")


def test_omi1_without_a_final_expression_uses_what_the_code_printed(pool):
    text = "<llm-code>\nprint((16 - 3 - 4) * 2)\n</llm-code>\n<llm-code-output>\n18\n</llm-code-output>\n\\boxed{18}"
    assert score(text, "18", pool=pool) == Verdict(True, "omi1", "18", None, True)


def test_code_that_fails_is_wrong_with_the_error(pool):
    broken = TINYGSM.replace("return result", "return result / 0")
    verdict = score(broken, "18", pool=pool)
    assert (verdict.correct, verdict.answer) == (False, None) and "ZeroDivisionError" in verdict.error
    endless = "def simple_math_problem() -> int:\n    while True:\n        pass\n"
    verdict = score_batch([endless], ["18"], pool=pool, timeout=0.5)[0]
    assert not verdict.correct and "timeout" in verdict.error


def test_unclosed_code_block_is_wrong():
    verdict = score("<llm-code>\nx = 18\nx\n", "18")
    assert (verdict.correct, verdict.format) == (False, "omi1") and "not closed" in verdict.error


def test_score_batch_mixes_formats_in_order(pool):
    completions = [TINYGSM, TINYGSM_WRONG, OMI1_WRITES_96, TEXT_18, TEXT_6] * 6
    verdicts = score_batch(completions, ["18"] * len(completions), pool=pool)
    assert [v.correct for v in verdicts] == [True, False, True, True, False] * 6
    assert [v.format for v in verdicts[:5]] == ["tinygsm", "tinygsm", "omi1", "text", "text"]


def test_score_batch_from_a_worker_thread(pool):
    """math-verify's alarm only works in the main thread: scoring elsewhere must still work."""
    out = []
    cases = [TEXT_18, "so the answer is \\boxed{\\frac{36}{2}}", "\\boxed{\\text{eighteen}}"]
    thread = threading.Thread(target=lambda: out.extend(score_batch(cases, ["18"] * 3, pool=pool)))
    thread.start()
    thread.join(60)
    assert [v.correct for v in out] == [True, True, False]
    assert out[2].error


# ---------------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, answer", [
    ("1000", "1,000"),
    ("18", "$18"),
    ("18", "\\$18"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("18", "18 dollars"),
    ("18", "18\\text{ dollars}"),
    ("18", "18.0"),
    ("0.3", "0.30000000000000004"),      # float noise from executed code
    ("100000000000000000000", "1e+20"),
    ("18", "\\frac{36}{2}"),
    ("\\frac{\\sqrt{2}}{2}", "$\\frac{\\sqrt{2}}{2}$"),
    ("18", "x = 18"),
])
def test_equivalent(gold, answer):
    assert compare(gold, answer) == (True, None)


@pytest.mark.parametrize("gold, answer", [
    ("18", "6"),
    ("18", "18.5"),
    ("1000000", "1000001"),
    ("18", "2\\pi"),
    ("0.5", "\\frac{1}{3}"),
])
def test_not_equivalent(gold, answer):
    assert compare(gold, answer) == (False, None)


@pytest.mark.parametrize("answer", ["\\text{eighteen}", "eighteen", "?", "10^{10^{10}}", "x" * 2000])
def test_unparsable_answer_is_wrong_with_an_error(answer):
    correct, error = compare("18", answer)
    assert correct is False and error


def test_plain_numbers_take_the_fast_path(monkeypatch):
    import math_verify

    def refuse(*args, **kwargs):
        raise AssertionError("math-verify called for plain numbers")

    monkeypatch.setattr(math_verify, "parse", refuse)
    monkeypatch.setattr(math_verify, "verify", refuse)
    assert compare("18", "18") == (True, None)
    assert compare("1,000", "$1000") == (True, None)
    assert compare("18", "17") == (False, None)
