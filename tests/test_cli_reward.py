"""`echochamber sandbox` and `echochamber score`: one JSON object, exit status 0 whatever the snippet does."""

import json
import subprocess
import sys

import pytest

TINYGSM = "def simple_math_problem() -> int:\n    eggs = 16 - 3 - 4\n    result = eggs * 2\n    return result\n"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echochamber.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def one_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_sandbox_prints_the_result():
    result = one_json(cli("sandbox", "-", stdin=TINYGSM))
    assert set(result) == {"ok", "value", "stdout", "error", "seconds"}
    assert (result["ok"], result["value"], result["error"]) == (True, "18", None)


@pytest.mark.parametrize("code, error", [
    ("exit(3)\n", "SystemExit"),
    ("import os\nos._exit(7)\n", "status 7"),
    ("import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
    ("print('x' * 100_000_000)\n", "output limit"),
])
def test_sandbox_exits_zero_whatever_the_snippet_does(code, error):
    result = one_json(cli("sandbox", "-", stdin=code))
    assert result["ok"] is False and error in result["error"]


def test_sandbox_timeout_option():
    result = one_json(cli("sandbox", "--timeout", "0.5", "-", stdin="while True:\n    pass\n"))
    assert "timeout" in result["error"] and "0.5 s" in result["error"]


def test_score_prints_the_verdict():
    verdict = one_json(cli("score", "--gold", "18", "-", stdin=TINYGSM))
    assert verdict == {"correct": True, "format": "tinygsm", "answer": "18", "error": None, "consistent": None}
    verdict = one_json(cli("score", "--gold", "18", "-", stdin="So she makes \\boxed{6} dollars."))
    assert (verdict["correct"], verdict["format"], verdict["answer"]) == (False, "text", "6")


def test_score_accepts_a_gsm8k_solution_as_gold():
    verdict = one_json(cli("score", "--gold", "9 * 2 = 18\n#### 18", "-", stdin="\\boxed{18}"))
    assert verdict["correct"] is True


def test_misuse_is_a_nonzero_exit():
    assert cli("score", "-", stdin=TINYGSM).returncode != 0                  # no --gold
    assert cli("sandbox", "/no/such/file.py").returncode != 0
    assert cli("no-such-command").returncode != 0
