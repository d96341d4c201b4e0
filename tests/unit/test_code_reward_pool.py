"""reward=code through the trainer's own reward stack (built from the config, scoring in its worker
processes): hostile programs each score 0 and are counted, the workers and this process are unharmed,
nothing they started is left running, no secret reaches a program; a right program scores 1 beside them.
Each hostile program prints the right answer only if its attack worked, so a breach would score 1."""

from __future__ import annotations

import os
import socket
import time

import pytest

from r1mega.config.loader import load_config
from r1mega.data.tasks import make_task
from r1mega.rewards.stack import RewardInput
from r1mega.rewards.sandbox import SandboxUnavailable
from r1mega.rollout.setup import make_reward_stack

ANSWER = "print(int(input())+{k})"


def _hostile(secret: str, port: int, planted: str) -> dict:
    """name -> program; `{answer}` is the right program's line, printed only when the attack succeeded."""
    return {
        "fork bomb": "import os\nwhile True:\n    os.fork()\n{answer}",
        "memory bomb": "x = bytearray(4 << 30)\n{answer}",
        "infinite loop": "while True:\n    pass\n{answer}",
        "busy loop in C": "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\n{answer}",
        "socket to 127.0.0.1": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n{{answer}}",
        "socket outward": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n{answer}",
        "read /proc/1/environ": "data = open('/proc/1/environ', 'rb').read().strip(b'\\0')\nassert data\n{answer}",
        "read the trainer's files": f"open({secret!r}).read()\n{{answer}}",
        "read ~/.ssh": "import os\nos.listdir('/root/.ssh')\n{answer}",
        "write outside its tmpfs": f"open({planted!r}, 'w').write('x')\n{{answer}}",
        "kill its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                           "os.kill(-1, signal.SIGKILL)",
        "daemon that outlives it": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                   "        time.sleep(120)\n    os._exit(0)",
        "print 1 GB": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
    }


def _descendants(pids) -> list:
    """Live processes (not zombies) below the given ones."""
    parent = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"{entry.path}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    parent[int(entry.name)] = int(ppid)
            except OSError:
                pass
    found = []
    for pid in parent:
        up = parent.get(pid)
        while up is not None and up not in pids:
            up = parent.get(up)
        if up is not None:
            found.append(pid)
    return found


def _response(program: str) -> str:
    return f" <think> n </think> <answer> ```python\n{program}\n``` </answer>"


def test_hostile_programs_through_the_trainers_reward_workers(tmp_path):
    cfg = load_config(["data=code", "reward=code", "reward.code.test_timeout_s=1", "reward.code.budget_s=3",
                       "reward.code.memory_mb=512", "reward.code.processes=32"])
    try:
        stack, names = make_reward_stack(cfg)
    except SandboxUnavailable as e:  # pragma: no cover - CI installs bubblewrap (scripts/setup.sh)
        pytest.fail(f"bubblewrap must run here: {e}")
    row = next(r for r in make_task("code", "test", 50, seed=0) if r.metadata["family"] == "plus")
    answer = ANSWER.format(k=row.metadata["k"])
    secret = tmp_path / "run" / "checkpoint.key"
    secret.parent.mkdir()
    secret.write_text("do not read")
    planted = tmp_path / "run" / "planted"
    listener = socket.create_server(("127.0.0.1", 0))
    hostile = _hostile(str(secret), listener.getsockname()[1], str(planted))
    programs = [answer] + [p.replace("{answer}", answer) for p in hostile.values()] + [answer]
    samples = [RewardInput(_response(p), row.answer, "code", row.metadata) for p in programs]
    try:
        workers = [w.proc.pid for w in stack._pool.workers]
        start = time.monotonic()
        out = stack.score(samples)
        elapsed = time.monotonic() - start
        assert out.components["accuracy"] == [1.0] + [0.0] * len(hostile) + [1.0], \
            dict(zip(["right", *hostile, "right"], out.components["accuracy"]))
        # every hostile program was stopped by the sandbox, not by the reward deadline: no worker was lost
        assert (out.failures, out.timeouts) == (0, 0) and [w.proc.pid for w in stack._pool.workers] == workers
        counts = out.counts
        assert counts["pass"] == 6 and counts["timeout"] >= 2 and counts["error"] >= 9  # 3 tests per program
        assert sum(counts.values()) == 3 * len(programs)
        assert elapsed < 600  # contained by the per-test limits, not hung on one of them
        assert not planted.exists() and secret.read_text() == "do not read"
        listener.settimeout(0.1)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody connected
        for _ in range(50):  # the kernel takes a moment to kill a dead namespace's processes
            left = _descendants(set(workers))
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"processes left running under the reward workers: {left}"
        again = stack.score(samples[:1])  # the same workers go on scoring
        assert again.components["accuracy"] == [1.0] and [w.proc.pid for w in stack._pool.workers] == workers
    finally:
        listener.close()
        stack.close()
    assert names == ["accuracy"]


def test_code_rows_without_reward_code_are_refused(tmp_path):
    from r1mega.trainer.rl.setup import prompts

    cfg = load_config(["data=code", "reward=r1_zero"])
    with pytest.raises(ValueError, match="needs reward.code to run its programs: add reward=code"):
        prompts(cfg, tokenizer=None)


def test_a_missing_bwrap_refuses_reward_code_unless_unsandboxed_by_name(tmp_path, caplog):
    cfg = load_config(["data=code", "reward=code", f"reward.code.bwrap={tmp_path}/no-bwrap"])
    with pytest.raises(SandboxUnavailable, match="never run unsandboxed unless reward.code.sandbox=none"):
        make_reward_stack(cfg)
    cfg = load_config(["data=code", "reward=code", "reward.code.sandbox=none", "reward.num_workers=1"])
    stack, _ = make_reward_stack(cfg)
    row = make_task("code", "test", 1, seed=0)[0]
    try:
        with caplog.at_level("WARNING", logger="r1mega.rewards"):
            out = stack.score([RewardInput(_response(row.answer), row.answer, "code", row.metadata)] * 2)
        assert out.components["accuracy"] == [1.0, 1.0]
        assert any("2 model-written programs ran WITHOUT a sandbox" in r.getMessage() for r in caplog.records)
    finally:
        stack.close()
