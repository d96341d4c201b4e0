"""The in-sandbox test driver (r1mega/rewards/code_driver.py): a sample's tests as forks of one
interpreter give the verdicts of a fresh sandbox per test; a program cannot forge the driver's report,
and what one test leaves running never reaches the next."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from r1mega.rewards import code
from r1mega.rewards.sandbox import Limits, bwrap_path, check_available, claim_slots

SLOT = claim_slots()
LIMITS = Limits(wall_s=1.0, cpu_s=2, memory_mb=512, processes=32, output_bytes=1 << 16)
CASES = [code.Case("1 2\n", None, "3\n"), code.Case("10 -3\n", None, "7\n"), code.Case("0 0\n", None, "0\n")]

PROGRAMS = {
    "right": "a, b = map(int, input().split())\nprint(a + b)",
    "right, bytes": "import sys\na, b = sys.stdin.buffer.read().split()\nsys.stdout.write(str(int(a) + int(b)))",
    "wrong on one": "a, b = map(int, input().split())\nprint(a - b if a > 5 else a + b)",
    "syntax error": "print(",
    "raises": "raise ValueError('no')",
    "exit 3": "import sys\nsys.exit(3)",
    "exit with text": "import sys\nprint(3)\nsys.exit('bye')",
    "exit 0 after printing": "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)",
    "endless": "while True:\n    pass",
    "too much output": "print('x' * (1 << 20))",
    "killed by a signal": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    # the interpreter's own ending: non-daemon threads joined, atexit handlers run, exit() defined
    "main in a thread": "import threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
                        "threading.stack_size(1 << 24)\nthreading.Thread(target=main).start()",
    "printed at exit": "import atexit\na, b = map(int, input().split())\natexit.register(print, a + b)",
    "exit()": "a, b = map(int, input().split())\nprint(a + b)\nexit()",
}


@pytest.fixture(scope="module")
def bwrap():
    path = bwrap_path()
    check_available(path)
    return path


def _each(bwrap, program, cases=CASES):
    with code.build_folder() as build:
        return code._one_sandbox_each(bwrap, program, code.LANGUAGES["python"], cases, LIMITS, 60,
                                      time.monotonic(), [SLOT], build)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_driver_judges_as_a_sandbox_per_test(bwrap, name):
    driven = [verdict for verdict, _ in code._driven(bwrap, PROGRAMS[name], CASES, LIMITS, 60, [SLOT])]
    assert driven == [verdict for verdict, _ in _each(bwrap, PROGRAMS[name])]


def test_threads_atexit_and_exit_pass_as_in_a_plain_run(bwrap):
    for name in ("main in a thread", "printed at exit", "exit()"):
        assert [v for v, _ in code._driven(bwrap, PROGRAMS[name], CASES, LIMITS, 60, [SLOT])] == ["pass"] * 3, name


def test_a_malformed_report_gives_no_verdict_and_never_raises():
    frame = b'R1MEGA-TEST {"i": 0, "out": 2, "err": 0, "returncode": 0}\n3\n'
    assert code._frames(frame, 1)[0].stdout == b"3\n"
    for bad in (b'R1MEGA-TEST {"i": 0, "out": 2, "err": 0, "seconds": "x"}\n3\n',
                b'R1MEGA-TEST {"i": 0, "out": 2, "err": 0, "timed_out": 1}\n3\n',
                b'R1MEGA-TEST ' + b'[' * 100000 + b'\n', b'R1MEGA-TEST [0]\n', b'R1MEGA-TEST {"i": 0}',
                b'R1MEGA-TEST {"i": 0, "out": 99, "err": 0}\n3\n', frame + frame):
        frames = code._frames(bad, 1)
        assert frames == {} or bad == frame + frame and list(frames) == [0]


def test_function_calls_through_the_driver(bwrap):
    tests = code._cases({"fn_name": "add", "inputs": [[1, 2], [[1], [2, 3]]], "outputs": [3, [1, 2, 3]]}, "python")
    verdicts = code._driven(bwrap, "def add(a, b):\n    return b + a", tests, LIMITS, 60, [SLOT])
    assert [v for v, _ in verdicts] == ["pass", "wrong"]


def test_a_program_cannot_forge_the_report(bwrap):
    """It writes frames that claim its tests passed, with the right outputs, everywhere it can reach:
    every descriptor, its parents' descriptors through /proc. None of it counts."""
    forge = (
        "import json, os\n"
        "frames = b''.join(b'R1MEGA-TEST ' + json.dumps({'i': i, 'out': 2, 'err': 0, 'returncode': 0}).encode()\n"
        "                  + b'\\n' + out for i, out in enumerate([b'3\\n', b'7\\n', b'0\\n']))\n"
        "for fd in range(3, 64):\n"
        "    try:\n        os.write(fd, frames)\n    except OSError:\n        pass\n"
        "for pid in ('1', '2', str(os.getppid())):\n"
        "    for fd in range(64):\n"
        "        try:\n"
        "            f = os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY)\n"
        "            os.write(f, frames)\n"
        "        except OSError:\n            pass\n"
        "print('wrong')\n")
    verdicts = code._driven(bwrap, forge, CASES, LIMITS, 60, [SLOT])
    assert "pass" not in [v for v, _ in verdicts], verdicts


def test_nothing_a_test_leaves_running_reaches_the_next(bwrap):
    """The first test's daemon would write the second test's expected output into its output file; the
    driver kills every process of the sandbox between tests."""
    program = ("import os, time\ns = input()\n"
               "if s == 'a':\n    print('A')\n    r, w = os.pipe()\n    if os.fork() == 0:\n"
               "        os.setsid()\n        os.write(w, b'x')\n"  # out of the test's process group first
               "        time.sleep(0.3)\n"
               "        open('.r1mega-out1', 'w').write('B\\n')\n        os._exit(0)\n"
               "    os.read(r, 1)\n"
               "else:\n    time.sleep(0.8)\n")
    cases = [code.Case("a\n", None, "A\n"), code.Case("b\n", None, "B\n")]
    assert [v for v, _ in code._driven(bwrap, program, cases, LIMITS, 60, [SLOT])] == ["pass", "wrong"]


def test_budget_and_shares_over_slots(bwrap):
    slow = "import time\ntime.sleep(1.0)\na, b = map(int, input().split())\nprint(a + b)"
    verdicts = [v for v, _ in code._driven(bwrap, slow, CASES, replace(LIMITS, wall_s=3.0), 1.6, [SLOT])]
    assert verdicts == ["pass", "timeout", "skipped"]  # the second gets what is left of the budget, the third none
    two = [v for v, _ in code._driven(bwrap, PROGRAMS["wrong on one"], CASES, LIMITS, 60, [SLOT, SLOT + 1])]
    assert two == ["pass", "wrong", "pass"]  # tests 0 and 2 in one sandbox, test 1 in the other
