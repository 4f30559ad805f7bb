"""Format classification is exact: definitions and code blocks, not substrings."""

import pytest

from echochamber import formats

TINYGSM = '''def simple_math_problem() -> int:
    """
    Janet has 16 eggs.
    """
    eggs = 16
    result = eggs - 3
    return result'''

OMI1 = """Let's solve this problem using Python code.
<llm-code>
eggs = 16 - 3 - 4
eggs * 2
</llm-code>
<llm-code-output>
18
</llm-code-output>
Thus she makes \\boxed{18} dollars."""


@pytest.mark.parametrize("text, fmt", [
    (TINYGSM, "tinygsm"),
    (OMI1, "omi1"),
    ("She has 16 - 3 = 13 eggs. So the answer is \\boxed{13}.", "text"),
    ("First we define x as the number of eggs. Then x = 13.", "text"),
    ("We write def f(x) for the function, and def is short for define.", "text"),
    ("Let def(x) = 3:\nthen", "text"),
    ("Some words first.\ndef helper(a, b):\n    return a + b", "tinygsm"),
    ("def f():  # a comment\n    return 1", "tinygsm"),
    ("<llm-code>\nx = 1\n", "omi1"),  # an unclosed block still chose the format
    ("", "text"),
])
def test_classify(text, fmt):
    assert formats.classify(text) == fmt


def test_extract_function_stops_at_dedent():
    fn = formats.extract_function(TINYGSM + "\nprint('trailing prose')")
    assert fn.name == "simple_math_problem"
    assert fn.source.rstrip().endswith("return result")


def test_extract_code_block_parts():
    block = formats.extract_code_block(OMI1)
    assert block.code.strip().endswith("eggs * 2")
    assert block.output.strip() == "18"
    assert block.boxed == "18"
    assert formats.extract_code_block("<llm-code>\nx = 1").code is None


@pytest.mark.parametrize("text, boxed", [
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box", None),
    ("\\boxed{12", None),
])
def test_last_boxed(text, boxed):
    assert formats.last_boxed(text) == boxed


def test_last_number():
    assert formats.last_number("she pays $1,250.50 for 3 hats") == "3"
    assert formats.last_number("total: $1,250") == "1250"
    assert formats.last_number("none") is None


def test_document_layout():
    assert formats.document("Q?", "A") == "Q?\n\nA"
    assert formats.prompt(" Q? ") == "Q?\n\n"
