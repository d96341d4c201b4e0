"""Accuracy for programs: the response's final code block, run against a row's tests in the sandbox.

Two test styles, as the datasets write them:
  stdin/stdout  `inputs` and `outputs`, lists of strings (CodeContests, TACO, APPS): each input goes
                to the program's stdin; the output must match, whitespace-normalised (lines stripped
                of trailing blanks, trailing empty lines dropped).
  function call a `test` program (HumanEval, LeetCode-style asserts) run after the code, calling
                `check(<entry_point>)` when it defines check; or `fn_name` with `inputs` (each a list
                of arguments) and `outputs` (each the result), compared as JSON values.

Languages come from a table of compile and run commands (`Language`); Python runs directly, C++
compiles with g++ inside the sandbox first. The score is the fraction of tests passed, or 1 only
when all pass (`all_or_nothing`). Each test has its own wall limit and the whole sample a budget;
tests left when the budget is spent count as failed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from r1mega.rewards.sandbox import BUILD_DIR, CODE_DIR, Limits, Outcome, build_folder, run

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Language:
    """How to build and run one source file `main.<suffix>` (under /code, read-only; /work is writable)."""

    suffix: str
    run: Tuple[str, ...]
    compile: Tuple[str, ...] = ()
    fences: Tuple[str, ...] = ()  # code-fence tags that name it (```python)


LANGUAGES: Dict[str, Language] = {
    "python": Language("py", ("/usr/bin/python3", "-I", "-S", f"{CODE_DIR}/main.py"),
                       fences=("python", "py", "python3")),
    "cpp": Language("cpp", (f"{BUILD_DIR}/main",),
                    ("/usr/bin/g++", "-O2", "-std=c++17", "-o", f"{BUILD_DIR}/main", f"{CODE_DIR}/main.cpp"),
                    fences=("cpp", "c++", "cc")),
}


@dataclass
class TestReport:
    passed: int
    total: int
    first_failure: str = ""  # why the first failing test failed (a wrong answer, a time-out, an error)
    seconds: float = 0.0
    outcomes: List[str] = field(default_factory=list)  # per test: pass | wrong | timeout | error | skipped


def extract_code(response: str, language: str) -> Optional[str]:
    """The last fenced code block of the response after its reasoning (</think>), preferring one tagged
    with the language; None when there is none."""
    text = response.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    tagged = [code for tag, code in blocks if tag.lower() in LANGUAGES[language].fences]
    return (tagged or [code for _, code in blocks])[-1]


def normalise(text: str) -> str:
    """Whitespace-normalised output: each line's trailing blanks and the trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def run_tests(bwrap: str, code: str, tests: Dict[str, Any], language: str, per_test: Limits,
              budget_s: float, slot: int = 0) -> TestReport:
    """Run `code` against the row's tests (see the module doc); never raises for what the program does.
    A compiled language builds once, in a sandbox of its own whose only writable host folder is the
    build's, and every test runs the result read-only."""
    lang = LANGUAGES[language]
    start = time.monotonic()
    cases = _cases(tests, language)
    report = TestReport(0, len(cases))
    with build_folder() as build:
        if lang.compile:
            built = run(bwrap, list(lang.compile), b"", {f"main.{lang.suffix}": code.encode()},
                        replace(per_test, wall_s=min(per_test.wall_s * 3, budget_s)), slot, (build, True))
            verdict, why = _judge(built, None)
            if verdict != "pass":
                report.first_failure, report.outcomes = f"does not compile: {why}", ["error"] * len(cases)
                report.seconds = time.monotonic() - start
                return report
        for stdin, source, expected in cases:
            left = budget_s - (time.monotonic() - start)
            if left <= 0:
                report.outcomes.append("skipped")
                report.first_failure = report.first_failure or f"the sample's {budget_s:g}s budget ran out"
                continue
            program = code if source is None else code + "\n\n" + source
            out = run(bwrap, list(lang.run), stdin.encode(), {f"main.{lang.suffix}": program.encode()},
                      replace(per_test, wall_s=min(per_test.wall_s, left)), slot, (build, False))
            verdict, why = _judge(out, expected)
            report.outcomes.append(verdict)
            report.passed += verdict == "pass"
            if verdict != "pass" and not report.first_failure:
                report.first_failure = why
    report.seconds = time.monotonic() - start
    return report


def score(report: TestReport, all_or_nothing: bool) -> float:
    if report.total == 0:
        return 0.0
    if all_or_nothing:
        return float(report.passed == report.total)
    return report.passed / report.total


def _cases(tests: Dict[str, Any], language: str) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """(stdin, test source appended to the code or None, expected stdout or None: exit status 0 passes)."""
    if "test" in tests:  # a test program: asserts, and check(entry_point) when it defines check
        if language != "python":
            raise ValueError(f"a 'test' program runs with Python code only, not {language}")
        source = str(tests["test"])
        entry = tests.get("entry_point")
        if entry and re.search(r"^def check\(", source, re.MULTILINE):
            source += f"\n\ncheck({entry})\n"
        return [("", source, None)]
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("tests need 'inputs' and 'outputs' lists of one length (or a 'test' program)")
    name = tests.get("fn_name")
    if name is None:
        return [(str(i), None, str(o)) for i, o in zip(inputs, outputs)]
    if language != "python":
        raise ValueError(f"fn_name tests run with Python code only, not {language}")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", str(name)):
        raise ValueError(f"fn_name {name!r} is not a Python name")
    call = f"Solution().{name}" if "." not in str(name) and _is_method(tests) else str(name)
    # the arguments and result travel as JSON on stdin and stdout: nothing of the row is pasted into code
    harness = ("import json as _j, sys as _s\n_args = _j.loads(_s.stdin.read())\n"
               f"_s.stdout.write(_j.dumps({call}(*_args)))\n")
    return [(json.dumps(i if isinstance(i, list) else [i]), harness, json.dumps(o)) for i, o in zip(inputs, outputs)]


def _is_method(tests: Dict[str, Any]) -> bool:
    return bool(tests.get("method"))  # LeetCode rows: fn_name is a method of class Solution


def _judge(out: Outcome, expected: Optional[str]) -> Tuple[str, str]:
    if out.timed_out:
        return "timeout", f"timed out after {out.seconds:.1f}s"
    if out.output_exceeded:
        return "error", "printed more than the output limit"
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return "error", f"exit code {out.returncode}: {tail[0][:200]}"
    if expected is None:
        return "pass", ""
    got = out.stdout.decode(errors="replace")
    if _same_output(got, expected):
        return "pass", ""
    return "wrong", f"expected {normalise(expected)[:80]!r}, got {normalise(got)[:80]!r}"


def _same_output(got: str, expected: str) -> bool:
    if normalise(got) == normalise(expected):
        return True
    try:  # fn_name results are JSON values
        return json.loads(got) == json.loads(expected)
    except (ValueError, RecursionError):
        return False
