"""The code sandbox against hostile programs: each is stopped or contained, scores nothing, leaves no
process behind, and the parent (the scorer) is unharmed. Real bubblewrap (scripts/setup.sh installs it)."""

from __future__ import annotations

import json
import os
import time

import pytest

from r1mega.rewards.sandbox import SANDBOX_UID_BASE, Limits, bwrap_path, check_available, claim_slots, run

PYTHON = ["/usr/bin/python3", "-I", "-S", "/code/main.py"]
# pytest-xdist runs another test process beside this one, and the process limit and the left-running
# check count a uid's processes wherever they are
SLOT = claim_slots()  # slots of this test process's own: no other process of the host uses them
LIMITS = Limits(wall_s=5.0, cpu_s=3, memory_mb=256, processes=32, output_bytes=1 << 16)


@pytest.fixture(scope="module")
def bwrap():
    path = bwrap_path()
    check_available(path)
    return path


def _python(bwrap, source: str, stdin: bytes = b"", limits: Limits = LIMITS, slot: int = SLOT):
    return run(bwrap, PYTHON, stdin, {"main.py": source.encode()}, limits, slot)


def _left_running(slot: int = SLOT) -> list:
    """Live processes of the slot's uid (the sandbox's own, as root), after the kernel has had a moment to
    kill a dead namespace's; zombies, which hold nothing but a pid until the host's init reaps them, do
    not count."""
    for _ in range(50):
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.stat(entry.path).st_uid == SANDBOX_UID_BASE + slot and \
                            open(f"{entry.path}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(entry.name)
                except OSError:
                    pass
        if not found:
            return []
        time.sleep(0.1)
    return found


def test_an_honest_program_reads_stdin_and_writes_stdout(bwrap):
    out = _python(bwrap, "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", b"1 2 3\n")
    assert (out.returncode, out.stdout, out.timed_out) == (0, b"6\n", False)


HOSTILE = {
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "fails"),
    "memory bomb": ("x = bytearray(4 << 30)\nprint('allocated')", "fails"),
    "infinite loop": ("while True:\n    pass", "killed"),
    "busy loop in C": ("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\nprint('done')", "killed"),
    "socket to 127.0.0.1": ("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 22))\n"
                            "print('connected')", "fails"),
    "socket outward": ("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=1)\nprint('connected')",
                       "fails"),
    "read /proc/1/environ": ("import sys\ndata = open('/proc/1/environ', 'rb').read()\n"
                             "sys.stdout.write('leak' if data.strip(b'\\0') else '')", "silent"),
    "read ~/.ssh": ("import os\nprint(os.listdir('/root/.ssh'))", "fails"),
    "write outside its tmpfs": ("open('/usr/pwned', 'w').write('x')", "fails"),
    "write into its files": ("open('/code/main.py', 'w').write('x')", "fails"),
    "kill its parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                        "print('killed')", "any"),
    "daemon that outlives it": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                "        time.sleep(60)\n    os._exit(0)\nprint('detached')", "any"),
    "write to / and /dev/shm": ("for p in ('/x', '/dev/x', '/dev/shm/x'):\n    try:\n        open(p, 'w')\n"
                                "        print('allocated', p)\n    except OSError:\n        pass\nraise SystemExit(1)",
                                "fails"),  # bwrap's own root and /dev are tmpfs mounts: read-only
    "fill its tmpfs": ("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\nprint('allocated')",
                       "fails"),  # 512 MB into a 64 MiB tmpfs, in files under the file-size limit
    "print 1 GB": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
                   "killed"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_are_contained(bwrap, name):
    source, expect = HOSTILE[name]
    start = time.monotonic()
    out = _python(bwrap, source)
    assert time.monotonic() - start < LIMITS.wall_s + 5
    if expect == "fails":
        assert out.returncode not in (0, None) and b"connected" not in out.stdout and b"allocated" not in out.stdout
    elif expect == "killed":
        assert out.returncode != 0 and (out.timed_out or out.output_exceeded or out.returncode < 0
                                        or out.returncode in (137, 152))
        assert len(out.stdout) <= LIMITS.output_bytes
    elif expect == "silent":
        assert b"leak" not in out.stdout, out.stdout
    assert _left_running() == [], name


def test_nothing_of_the_host_is_visible(bwrap):
    out = _python(bwrap, "import json, os\nprint(json.dumps([sorted(os.listdir('/')), dict(os.environ), os.getcwd()]))")
    listing, env, cwd = json.loads(out.stdout)
    assert not set(listing) & {"root", "home", "srv", "opt", "tmp", "etc", "var"}, listing
    assert set(env) <= {"HOME", "PATH", "LANG", "PWD", "TMPDIR"} and cwd == "/work"
