"""Runs one Python program against several stdin inputs inside ONE sandbox (standard library only).

Started by r1mega.rewards.code as `python3 -I /code/driver.py '<settings JSON>'` inside bubblewrap,
with the program at /code/main.py and test k's input at /code/in<k> beside it, in the working
directory /work. Starting a sandbox and a Python
interpreter costs more than a short test itself, so each test runs in a fork of this already started
interpreter instead: the child takes the test's input as stdin and files as stdout and stderr, closes
every other descriptor, and executes the program as `__main__`. The driver waits for it up to the
per-test wall limit, kills its process group at the limit, then every process left in the sandbox
(`kill(-1)`: daemons of one test never see the next), and reports.

The report goes to stdout, one frame per test: `R1MEGA-TEST <header JSON>\\n`, then the stdout and the
stderr bytes the header counts. The program cannot widen its reach this way: it runs in the same
sandbox as a program started on its own, with the same limits. The driver is not dumpable, so a
test's process cannot reach its report through /proc; and were a frame imitated, it still would
not say that a test passed: the expected outputs never enter the sandbox, the host compares. A
corrupted report fails the tests it covers.
"""

import ctypes
import json
import os
import select
import signal
import sys
import time

_HEADER = b"R1MEGA-TEST "
_PR_SET_DUMPABLE = 4
_FILES = os.path.dirname(os.path.abspath(__file__))  # /code in the sandbox
_PROGRAM = os.path.join(_FILES, "main.py")


def _child(source, in_path, out_path, err_path):
    """The test's process: its files as stdin, stdout and stderr, nothing else of the driver's open, the
    program run as __main__, then what the interpreter does when a program ends (an exception's
    traceback and status 1, SystemExit's status, non-daemon threads joined, atexit handlers run,
    output flushed) without tearing the interpreter down, which would cost more than the test."""
    os.setpgid(0, 0)
    for fd, path, flags in ((0, in_path, os.O_RDONLY), (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.closerange(3, 1 << 16)  # nothing of the driver's: not its report
    # as CPython makes them on POSIX: lines split at "\n" only
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", newline="\n", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", newline="\n", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", newline="\n",
                                       closefd=False)
    sys.argv = [_PROGRAM]
    status = _run(lambda: exec(compile(source, _PROGRAM, "exec"),
                               {"__name__": "__main__", "__file__": _PROGRAM, "__builtins__": __builtins__}))
    if "threading" in sys.modules:
        status = _run(sys.modules["threading"]._shutdown) or status  # joins non-daemon threads
    import atexit

    status = _run(atexit._run_exitfuncs) or status
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 1
    os._exit(status & 0xFF)


def _run(fn):
    """fn's exit status as the interpreter would give it for a program."""
    try:
        fn()
        return 0
    except SystemExit as e:
        if e.code is None or type(e.code) is int:
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _read(path, limit):
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError:
        return b""


def _one(index, source, wall_s, limit):
    in_path = os.path.join(_FILES, f"in{index}")  # written by the host, read-only here
    out_path, err_path = (f".r1mega-{kind}{index}" for kind in ("out", "err"))  # in the working directory, /work
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(source, in_path, out_path, err_path)
    watch = os.pidfd_open(pid)
    finished = select.select([watch], [], [], max(wall_s, 0.0))[0]
    if not finished:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, status = os.waitpid(pid, 0)
    os.close(watch)
    try:  # what it started in its own process group
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    seconds = time.monotonic() - start
    out, err = _read(out_path, limit), _read(err_path, limit)
    for path in (out_path, err_path):
        try:
            os.unlink(path)
        except OSError:
            pass
    header = {"i": index, "seconds": round(seconds, 4), "timed_out": not finished,
              "exceeded": len(out) > limit or len(err) > limit}
    if os.WIFSIGNALED(status):
        header["returncode"] = -os.WTERMSIG(status)
    else:
        header["returncode"] = os.WEXITSTATUS(status)
    return header, out[:limit], err[:limit]


def _sweep():
    """Kill every process of the sandbox but this one and its init (what a test left behind). Never
    outside a PID namespace of its own (reward.code.sandbox=none), where it would kill the user's."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def main():
    # not dumpable: a test's process (same uid) cannot open this one's descriptors or memory through /proc
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    settings = json.loads(sys.argv[1])
    with open(_PROGRAM, encoding="utf-8") as f:
        source = f.read()
    report = os.dup(1)
    start = time.monotonic()
    for index in range(settings["tests"]):
        left = settings["budget_s"] - (time.monotonic() - start)
        if left <= 0:
            header, out, err = {"i": index, "skipped": True}, b"", b""
        else:
            header, out, err = _one(index, source, min(settings["wall_s"], left), settings["output_bytes"])
            if settings["sweep"]:  # only inside the sandbox's own PID namespace: outside, kill(-1) reaches far
                _sweep()
        header["out"], header["err"] = len(out), len(err)
        frame = memoryview(_HEADER + json.dumps(header).encode() + b"\n" + out + err)
        while frame:
            frame = frame[os.write(report, frame):]


if __name__ == "__main__":
    main()
