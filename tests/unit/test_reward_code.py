"""Code accuracy: the final code block run against a row's tests in the real sandbox, both test styles,
Python and C++ (where g++ is installed), per-test time limits and the sample's budget."""

from __future__ import annotations

import shutil

import pytest

from r1mega.rewards.code import extract_code, normalise, run_tests, score
from r1mega.rewards.sandbox import Limits, bwrap_path, check_available, claim_slots

LIMITS = Limits(wall_s=5.0, cpu_s=5, memory_mb=512, processes=32)
SLOT = claim_slots()  # slots of this test process's own: no other process of the host uses them
SUM_TESTS = {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7", "0\n\n"]}


def _run(*args, **kwargs):
    return run_tests(*args, slots=(SLOT,), **kwargs)


@pytest.fixture(scope="module")
def bwrap():
    path = bwrap_path()
    check_available(path)
    return path


def fenced(code: str, tag: str = "python") -> str:
    return f"<think> easy </think> Here it is:\n```{tag}\n{code}\n```"


def test_the_last_block_after_the_reasoning_is_the_answer():
    response = ("<think>```python\nprint('draft')\n```</think> First:\n```python\nprint(1)\n```\n"
                "Better:\n```python\nprint(2)\n```\n```text\nexample output\n```")
    assert extract_code(response, "python").strip() == "print(2)"  # the last Python block, not the text one
    assert extract_code("<think>```python\nprint(0)\n```</think> no code", "python") is None
    assert extract_code("```\nint main() {}\n```", "cpp").strip() == "int main() {}"
    assert normalise("a  \r\nb\n\n\n") == "a\nb"


def test_stdin_stdout_right_wrong_and_partial(bwrap):
    right = "a, b = map(int, input().split())\nprint(a + b)"
    report = _run(bwrap, right, SUM_TESTS, "python", LIMITS, budget_s=30)
    assert (report.passed, report.total, report.outcomes) == (3, 3, ["pass"] * 3)  # whitespace normalised
    wrong = "a, b = map(int, input().split())\nprint(a - b if a > 5 else a + b)"  # subtly wrong on one test
    report = _run(bwrap, wrong, SUM_TESTS, "python", LIMITS, budget_s=30)
    assert report.outcomes == ["pass", "wrong", "pass"] and "expected '7', got '13'" in report.first_failure
    assert score(report, all_or_nothing=False) == pytest.approx(2 / 3)
    assert score(report, all_or_nothing=True) == 0.0
    crash = _run(bwrap, "raise SystemExit(3)", SUM_TESTS, "python", LIMITS, budget_s=30)
    assert crash.outcomes == ["error"] * 3 and crash.first_failure.startswith("exit code 3")


def test_a_test_program_passes_only_when_it_reaches_its_end(bwrap):
    """HumanEval style: a solution that exits with status 0 before the asserts run does not pass."""
    tests = {"test": "def check(f):\n    assert f(2) == 4\n", "entry_point": "twice"}
    assert _run(bwrap, "def twice(x):\n    return 2 * x", tests, "python", LIMITS, 30).passed == 1
    assert _run(bwrap, "def twice(x):\n    return x", tests, "python", LIMITS, 30).passed == 0
    for cheat in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()",
                  "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit"):
        report = _run(bwrap, "def twice(x):\n    return x\n" + cheat, tests, "python", LIMITS, 30)
        assert report.passed == 0, cheat


def test_function_call_styles(bwrap):
    tests = {"fn_name": "add", "inputs": [[1, 2], [[1], [2, 3]]], "outputs": [3, [1, 2, 3]]}
    assert _run(bwrap, "def add(a, b):\n    return a + b", tests, "python", LIMITS, 30).passed == 2
    assert _run(bwrap, "def add(a, b):\n    return b + a", tests, "python", LIMITS, 30).passed == 1
    leetcode = {"fn_name": "twice", "method": True, "inputs": [[2]], "outputs": [4]}
    method = "class Solution:\n    def twice(self, x):\n        return 2 * x"
    assert _run(bwrap, method, leetcode, "python", LIMITS, 30).passed == 1
    humaneval = {"test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(0) == 0\n",
                 "entry_point": "double"}
    assert _run(bwrap, "def double(x):\n    return x * 2", humaneval, "python", LIMITS, 30).passed == 1
    failing = _run(bwrap, "def double(x):\n    return x + 2", humaneval, "python", LIMITS, 30)
    assert failing.passed == 0 and "AssertionError" in failing.first_failure


def test_time_limits_per_test_and_per_sample(bwrap):
    slow = ("import sys\nline = sys.stdin.read()\nwhile line.startswith('10'):\n    pass\n"
            "print(sum(map(int, line.split())))")
    report = _run(bwrap, slow, SUM_TESTS, "python", Limits(wall_s=1.0, cpu_s=5), budget_s=30)
    assert report.outcomes == ["pass", "timeout", "pass"]
    starved = _run(bwrap, "while True:\n    pass", SUM_TESTS, "python", Limits(wall_s=1.0, cpu_s=5), budget_s=1.5)
    assert starved.outcomes[0] == "timeout" and starved.outcomes[-1] == "skipped" and starved.passed == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_cpp_compiles_once_and_runs_each_test(bwrap):
    right = "#include <iostream>\nint main() { long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }"
    report = _run(bwrap, right, SUM_TESTS, "cpp", LIMITS, budget_s=60)
    assert report.outcomes == ["pass"] * 3, report.first_failure
    wrong = right.replace("a + b", "a * b")
    assert _run(bwrap, wrong, SUM_TESTS, "cpp", LIMITS, budget_s=60).passed == 1  # 0 * 0 == 0 + 0
    broken = _run(bwrap, "int main() { return x; }", SUM_TESTS, "cpp", LIMITS, budget_s=60)
    assert broken.outcomes == ["error"] * 3 and broken.first_failure.startswith("does not compile")
