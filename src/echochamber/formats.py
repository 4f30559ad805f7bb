"""The three answer formats of the study, in one place: document layout, classification, extraction.

- ``tinygsm``: a Python function (``def simple_math_problem() -> int:``); the answer is its return value.
- ``omi1``: prose, a ``<llm-code>`` block whose last line is an expression, ``<llm-code-output>``, ``\\boxed{}``.
- ``text``: natural-language steps ending in ``\\boxed{}``.

Classification is exact, unlike the paper's substring test: a function counts only when a line
*starts* a ``def name(...)`` definition, so prose that says "define" or "def" stays ``text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("tinygsm", "omi1", "text")

CODE_OPEN, CODE_CLOSE = "<llm-code>", "</llm-code>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<llm-code-output>", "</llm-code-output>"

# A top-level function definition at the start of a line: `def name(args) -> T:`.
_DEF = re.compile(r"^def[ \t]+([A-Za-z_]\w*)[ \t]*\([^\n]*\)[^\n#]*:[ \t]*(?:#[^\n]*)?$", re.MULTILINE)


def prompt(question: str) -> str:
    """What the model sees: the raw question and the blank line that precedes every solution."""
    return question.strip() + "\n\n"


def document(question: str, solution: str) -> str:
    """A pretraining document without its EOS token (the tokenizer appends EOS).

    A raw-corpus document with no question is just its text.
    """
    if not question.strip():
        return solution.strip()
    return prompt(question) + solution.strip()


def classify(text: str) -> str:
    """Return ``"omi1"`` for a ``<llm-code>`` block, ``"tinygsm"`` for a function definition, else ``"text"``."""
    if CODE_OPEN in text:
        return "omi1"
    if _DEF.search(text):
        return "tinygsm"
    return "text"


@dataclass(frozen=True)
class Function:
    name: str
    source: str


def extract_function(text: str) -> Function | None:
    """The first top-level function a completion defines: its ``def`` line and indented body."""
    m = _DEF.search(text)
    if m is None:
        return None
    lines = text[m.start():].split("\n")
    body = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    return Function(name=m.group(1), source="\n".join(body).rstrip() + "\n")


@dataclass(frozen=True)
class CodeBlock:
    code: str | None          # None when the block is not closed
    output: str | None        # what the model wrote between the output tags
    boxed: str | None         # the last \boxed{} of the completion


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return None if end < 0 else text[start:end]


def extract_code_block(text: str) -> CodeBlock:
    return CodeBlock(
        code=_between(text, CODE_OPEN, CODE_CLOSE),
        output=_between(text, OUTPUT_OPEN, OUTPUT_CLOSE),
        boxed=last_boxed(text),
    )


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in a text (commas and ``$`` stripped), for unboxed prose answers."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").replace("$", "")
