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

`CodeRunner` is the reward side: it reads a row's tests from its metadata and scores the response.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from r1mega.rewards.sandbox import (BUILD_DIR, CODE_DIR, SLOTS_PER_GROUP, Limits, Outcome, build_folder, bwrap_path,
                                    check_available, claim_slots, run)

log = logging.getLogger("r1mega.rewards")
_DRIVER = (Path(__file__).parent / "code_driver.py").read_bytes()
_FRAME = b"R1MEGA-TEST "  # the driver's frame header
_DRIVER_START_S = 3.0  # a driver sandbox's start-up and tear-down on top of the tests' budget

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Language:
    """How to build and run one source file `main.<suffix>` (under /code, read-only; /work is writable)."""

    suffix: str
    run: Tuple[str, ...]
    compile: Tuple[str, ...] = ()
    fences: Tuple[str, ...] = ()  # code-fence tags that name it (```python)


LANGUAGES: Dict[str, Language] = {
    "python": Language("py", ("/usr/bin/python3", "-I", f"{CODE_DIR}/main.py"),
                       fences=("python", "py", "python3")),
    "cpp": Language("cpp", (f"{BUILD_DIR}/main",),
                    ("/usr/bin/g++", "-O2", "-std=c++17", "-o", f"{BUILD_DIR}/main", f"{CODE_DIR}/main.cpp"),
                    fences=("cpp", "c++", "cc")),
}


OUTCOMES = ("pass", "wrong", "timeout", "error", "skipped", "no_code")  # counted per test (no_code per sample)


class Case(NamedTuple):
    stdin: str
    source: Optional[str]  # appended to the program: a test program, or the harness of an fn_name call
    expected: str
    compare: str = "text"  # text (whitespace-normalised) | json (an fn_name result) | marker (the last line)


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


def run_tests(bwrap: Optional[str], code: str, tests: Dict[str, Any], language: str, per_test: Limits,
              budget_s: float, slots: Sequence[int] = (0,)) -> TestReport:
    """Run `code` against the row's tests (see the module doc); never raises for what the program does.
    Up to len(slots) sandboxes run at once, each slot a uid of its own as root. Python tests with
    expected outputs run in one sandbox per slot, forks of one interpreter (code_driver); the others
    (a test program, C++) each in a sandbox of its own. A compiled language builds once, in a sandbox
    whose only writable host folder is the build's, and every test runs the result read-only.
    bwrap=None runs without a sandbox (reward.code.sandbox=none)."""
    lang = LANGUAGES[language]
    start = time.monotonic()
    cases = _cases(tests, language)
    report = TestReport(0, len(cases))
    with build_folder() as build:
        if lang.compile:
            built = run(bwrap, list(lang.compile), b"", {f"main.{lang.suffix}": code.encode()},
                        replace(per_test, wall_s=min(per_test.wall_s * 3, budget_s)), slots[0], (build, True))
            verdict, why = _judge(built)
            if verdict != "pass":
                report.first_failure, report.outcomes = f"does not compile: {why}", ["error"] * len(cases)
                report.seconds = time.monotonic() - start
                return report
        if lang.suffix == "py":
            verdicts = _driven(bwrap, code, cases, per_test, budget_s - (time.monotonic() - start), slots)
        else:
            verdicts = _one_sandbox_each(bwrap, code, lang, cases, per_test, budget_s, start, slots, build)
    for verdict, why in verdicts:
        report.outcomes.append(verdict)
        report.passed += verdict == "pass"
        if verdict != "pass" and not report.first_failure:
            report.first_failure = why
    report.seconds = time.monotonic() - start
    return report


def _one_sandbox_each(bwrap: Optional[str], code: str, lang: Language, cases: List[Case], per_test: Limits,
                      budget_s: float, start: float, slots: Sequence[int], build: str) -> List[Tuple[str, str]]:
    """Each test in a fresh sandbox of its own, up to len(slots) at once (compiled programs, and test
    programs, which are judged by their exit status)."""
    free: "queue.Queue[int]" = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(case: Case) -> Tuple[str, str]:
        stdin, source = case.stdin, case.source
        left = budget_s - (time.monotonic() - start)
        if left <= 0:
            return "skipped", f"the sample's {budget_s:g}s budget ran out"
        slot = free.get()
        try:
            program = code if source is None else code + "\n\n" + source
            out = run(bwrap, list(lang.run), stdin.encode(), {f"main.{lang.suffix}": program.encode()},
                      replace(per_test, wall_s=min(per_test.wall_s, left)), slot, (build, False))
        finally:
            free.put(slot)
        return _judge(out, case)

    if len(slots) > 1 and len(cases) > 1:
        with ThreadPoolExecutor(min(len(slots), len(cases)), thread_name_prefix="r1mega-test") as pool:
            return list(pool.map(one, cases))
    return [one(case) for case in cases]


def _driven(bwrap: Optional[str], code: str, cases: List[Case], per_test: Limits, budget_s: float,
            slots: Sequence[int]) -> List[Tuple[str, str]]:
    """Python tests with expected outputs: the tests split over up to len(slots) sandboxes at once, each
    running its share in forks of one interpreter (r1mega.rewards.code_driver says how, and why a program
    gains nothing by tampering with the report)."""
    shares = [list(range(len(cases)))[j::len(slots)] for j in range(min(len(slots), len(cases)))]

    def share(job: Tuple[List[int], int]) -> Dict[int, Tuple[str, str]]:
        indices, slot = job
        source = code if cases[indices[0]].source is None else code + "\n\n" + cases[indices[0]].source
        files = {"main.py": source.encode(), "driver.py": _DRIVER,
                 **{f"in{k}": cases[i].stdin.encode() for k, i in enumerate(indices)}}
        settings = {"tests": len(indices), "wall_s": per_test.wall_s, "budget_s": budget_s,
                    "output_bytes": per_test.output_bytes, "sweep": bwrap is not None}
        limits = replace(per_test, wall_s=budget_s + _DRIVER_START_S,
                         output_bytes=len(indices) * (2 * per_test.output_bytes + 256))
        interpreter = list(LANGUAGES["python"].run[:-1])  # the program's own command, the driver in its place
        outcome = run(bwrap, [*interpreter, f"{CODE_DIR}/driver.py", json.dumps(settings)], b"",
                      files, limits, slot)
        frames = _frames(outcome.stdout, len(indices))
        verdicts = {}
        for k, i in enumerate(indices):
            if k not in frames:
                why = "timed out" if outcome.timed_out else "the sandbox's report ended early"
                verdicts[i] = ("timeout" if outcome.timed_out else "error", why)
            elif frames[k] is None:
                verdicts[i] = ("skipped", f"the sample's {budget_s:g}s budget ran out")
            else:
                verdicts[i] = _judge(frames[k], cases[i])
        return verdicts

    jobs = list(zip(shares, slots))
    if len(jobs) > 1:
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="r1mega-test") as pool:
            parts = list(pool.map(share, jobs))
    else:
        parts = [share(job) for job in jobs]
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(len(cases))]


def _frames(data: bytes, count: int) -> Dict[int, Optional[Outcome]]:
    """The driver's report: test k -> its Outcome (None: skipped). Parsing stops at the first frame that
    is malformed, repeated or out of range; the tests it would have covered get no verdict from it."""
    frames: Dict[int, Optional[Outcome]] = {}
    pos = 0
    while pos < len(data) and data.startswith(_FRAME, pos):
        end = data.find(b"\n", pos)
        try:
            header = json.loads(data[pos + len(_FRAME):end])
            k, n_out, n_err = header["i"], header["out"], header["err"]
            flags = [header.get(key, False) for key in ("skipped", "timed_out", "exceeded")]
            returncode, seconds = header.get("returncode"), header.get("seconds", 0.0)
            if not (type(k) is int and 0 <= k < count and k not in frames and type(n_out) is int
                    and type(n_err) is int and 0 <= n_out and 0 <= n_err and end > pos
                    and end + 1 + n_out + n_err <= len(data) and all(type(f) is bool for f in flags)
                    and (returncode is None or type(returncode) is int) and type(seconds) in (int, float)):
                break
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            break
        out, err = data[end + 1:end + 1 + n_out], data[end + 1 + n_out:end + 1 + n_out + n_err]
        pos = end + 1 + n_out + n_err
        skipped, timed_out, exceeded = flags
        if skipped:
            frames[k] = None
            continue
        code = None if timed_out or exceeded else returncode if returncode is not None else -1
        frames[k] = Outcome(code, out, err, timed_out, exceeded, float(seconds))
    return frames


def score(report: TestReport, all_or_nothing: bool) -> float:
    if report.total == 0:
        return 0.0
    if all_or_nothing:
        return float(report.passed == report.total)
    return report.passed / report.total


def _cases(tests: Dict[str, Any], language: str) -> List[Case]:
    """The row's tests as Cases. A test program passes when it gets to its end: it prints a marker of
    this run's own last, so a solution that exits early with status 0 (`sys.exit(0)` before the
    asserts run) does not pass."""
    if "test" in tests:  # a test program: asserts, and check(entry_point) when it defines check
        if language != "python":
            raise ValueError(f"a 'test' program runs with Python code only, not {language}")
        source = str(tests["test"])
        entry = tests.get("entry_point")
        if entry and re.search(r"^def check\(", source, re.MULTILINE):
            source += f"\n\ncheck({entry})\n"
        marker = f"r1mega-tests-passed-{secrets.token_hex(8)}"
        return [Case("", source + f"\nprint({marker!r})\n", marker, "marker")]
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise ValueError("tests need 'inputs' and 'outputs' lists of one length (or a 'test' program)")
    name = tests.get("fn_name")
    if name is None:
        return [Case(str(i), None, str(o)) for i, o in zip(inputs, outputs)]
    if language != "python":
        raise ValueError(f"fn_name tests run with Python code only, not {language}")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", str(name)):
        raise ValueError(f"fn_name {name!r} is not a Python name")
    call = f"Solution().{name}" if "." not in str(name) and _is_method(tests) else str(name)
    # the arguments and result travel as JSON on stdin and stdout: nothing of the row is pasted into code
    harness = ("import json as _j, sys as _s\n_args = _j.loads(_s.stdin.read())\n"
               f"_s.stdout.write(_j.dumps({call}(*_args)))\n")
    return [Case(json.dumps(i if isinstance(i, list) else [i]), harness, json.dumps(o), "json")
            for i, o in zip(inputs, outputs)]


def _is_method(tests: Dict[str, Any]) -> bool:
    return bool(tests.get("method"))  # LeetCode rows: fn_name is a method of class Solution


def _judge(out: Outcome, case: Optional[Case] = None) -> Tuple[str, str]:
    """(verdict, why): a time-out, an error (the output cap, a non-zero exit), then the output against
    the case's (none: a compile, judged by its exit status alone)."""
    if out.timed_out:
        return "timeout", f"timed out after {out.seconds:.1f}s"
    if out.output_exceeded:
        return "error", "printed more than the output limit"
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        return "error", f"exit code {out.returncode}: {tail[0][:200]}"
    if case is None:
        return "pass", ""
    got = out.stdout.decode(errors="replace")
    if case.compare == "marker":
        lines = normalise(got).split("\n")
        return ("pass", "") if lines[-1] == case.expected else ("error", "the test program stopped before its end")
    if normalise(got) == normalise(case.expected) or (case.compare == "json" and _same_json(got, case.expected)):
        return "pass", ""
    return "wrong", f"expected {normalise(case.expected)[:80]!r}, got {normalise(got)[:80]!r}"


def _same_json(got: str, expected: str) -> bool:
    try:
        return json.loads(got) == json.loads(expected)
    except (ValueError, RecursionError):
        return False


def row_tests(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """A code row's tests: metadata["tests"], an object or its JSON text (APPS and TACO store the text)."""
    tests = metadata.get("tests")
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, dict):
        raise ValueError(f"a code row's metadata.tests must be an object, got {type(tests).__name__}")
    return tests


def is_code_row(metadata: Dict[str, Any]) -> bool:
    return isinstance(metadata, dict) and "tests" in metadata


class CodeRunner:
    """Accuracy of a code row: its response's program against the row's tests; built from reward.code
    (CodeRewardConfig as a dict). A response without a code block scores 0, as does every failure of the
    program; a row whose tests are malformed raises (a failure of the reward, counted)."""

    def __init__(self, sandbox: str = "bwrap", bwrap: Optional[str] = None, language: str = "python",
                 all_or_nothing: bool = True, test_timeout_s: float = 5.0, budget_s: float = 20.0,
                 workers: int = 1, cpu_s: int = 5, memory_mb: int = 1024, processes: int = 64,
                 file_size_mb: int = 16, open_files: int = 64, output_bytes: int = 1 << 20, work_mb: int = 64):
        if language not in LANGUAGES:
            raise ValueError(f"reward.code.language={language!r}; known: {', '.join(LANGUAGES)}")
        if not 1 <= workers <= SLOTS_PER_GROUP:
            raise ValueError(f"reward.code.workers={workers} must be in 1..{SLOTS_PER_GROUP}")
        if not (test_timeout_s > 0 and budget_s > 0):
            raise ValueError("reward.code.test_timeout_s and budget_s must be > 0")
        self.bwrap = bwrap_path(bwrap) if sandbox == "bwrap" else None
        self.language, self.all_or_nothing, self.budget_s, self.workers = language, all_or_nothing, budget_s, workers
        self.limits = Limits(wall_s=test_timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, processes=processes,
                             file_size_mb=file_size_mb, open_files=open_files, output_bytes=output_bytes,
                             work_mb=work_mb)
        self._slots: Optional[List[int]] = None
        self.counts: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)  # since the last take_counts()

    def check(self) -> None:
        """SandboxUnavailable, saying why, where bubblewrap cannot start a sandbox here or the language's
        tools are missing inside it (the test driver needs Python 3.9's os.pidfd_open)."""
        if self.bwrap is None:
            return
        check_available(self.bwrap)
        if self.language == "python":
            interpreter = list(LANGUAGES["python"].run[:-1])
            check_available(self.bwrap, [*interpreter, "-c", "import os; os.pidfd_open"],
                            f"{interpreter[0]} 3.9 or newer")
        else:
            check_available(self.bwrap, [LANGUAGES[self.language].compile[0], "--version"],
                            LANGUAGES[self.language].compile[0])

    def time_limit_s(self) -> float:
        """The longest one sample can take: a compile (three test limits) and the budget, with a margin
        for starting and tearing down sandboxes."""
        return self.budget_s + (3 * self.limits.wall_s if LANGUAGES[self.language].compile else 0) + 5.0

    def __call__(self, sample: Any) -> float:
        tests = row_tests(sample.metadata)
        program = extract_code(sample.response, self.language)
        if program is None:
            self.counts["no_code"] += 1
            return 0.0
        if self._slots is None:  # claimed in the process that runs the programs (a reward worker)
            base = claim_slots()
            self._slots = [base + j for j in range(self.workers)]
        report = run_tests(self.bwrap, program, tests, self.language, self.limits, self.budget_s, self._slots)
        for outcome in report.outcomes:
            self.counts[outcome] += 1
        return score(report, self.all_or_nothing)

    def take_counts(self) -> Dict[str, int]:
        """How the tests ended since the last call (OUTCOMES), then zeros."""
        counts, self.counts = self.counts, dict.fromkeys(OUTCOMES, 0)
        return counts
