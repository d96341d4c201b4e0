"""Reward worker processes with a hard per-sample deadline enforced by the parent.

Samples go to workers in chunks; a worker streams back one result per sample, so the
parent knows which sample a silent worker is stuck on. A worker that misses its deadline
is killed (the sample times out), a new one takes its place, and its unscored samples go
back to the front of the queue. Rows are stored by input index, so order survives kills.

Nothing is ever scored in the trainer's process, where only SIGALRM could stop it and C-level
work (sympy on a huge integer) would stall the rank while the others wait in a collective: a
worker that dies while starting is replaced too (up to MAX_START_FAILURES in a row, then the
run stops saying why), and a sample that cannot be sent to a worker (it does not pickle)
scores 0 as a failure, alone.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import pickle
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from r1mega.rewards.components import Row, Scorer, score_sample

log = logging.getLogger("r1mega.rewards")
_CHUNK = 64  # most samples per message
_START_S = 120.0  # a new worker's time to import math-verify and resolve the custom targets
_READY = "ready"
MAX_START_FAILURES = 3  # replacement workers in a row that die before they are ready: then stop


def _worker_main(conn: Any, spec: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import math_verify  # noqa: F401  imported once here, not on the first math sample

        scorer = Scorer(**spec)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"[:500]))
        return
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        for index, sample in chunk:
            conn.send((index, score_sample(scorer, sample)))


def _context() -> Any:
    # never plain fork: the trainer is a multi-threaded torch process
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # the server imports these once; every worker (and every restart) is then a cheap fork of it
    ctx.set_forkserver_preload(["__main__", "r1mega.rewards.pool", "math_verify", "hydra.utils"])
    return ctx


class _Worker:
    def __init__(self, ctx: Any, spec: dict[str, Any]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True, name="r1mega-reward")
        self.proc.start()
        child.close()
        self.ready = False
        self.todo: deque[int] = deque()  # indices sent and not yet answered, in order
        self.deadline = time.monotonic() + _START_S

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """A fixed number of reward workers; run() scores samples and returns their rows in order."""

    def __init__(self, num_workers: int, spec: dict[str, Any], deadline_s: float):
        if num_workers < 1:
            raise ValueError(f"a worker pool needs num_workers >= 1, got {num_workers}")
        self._ctx, self._spec, self._deadline_s = _context(), spec, deadline_s
        self._width = len(spec["builtin"]) + len(spec["custom"])
        self._start_failures = 0  # consecutive replacements that died before they were ready
        self.workers = [_Worker(self._ctx, spec) for _ in range(num_workers)]
        self._await_ready()

    def _await_ready(self) -> None:
        for w in self.workers:
            msg: Any = f"no answer within {_START_S:.0f}s"
            try:
                if w.conn.poll(max(0.0, w.deadline - time.monotonic())):
                    msg = w.conn.recv()
            except (EOFError, OSError):
                msg = f"it exited with code {w.proc.exitcode}"
            if msg != _READY:
                self.close()
                detail = msg[1] if isinstance(msg, tuple) else msg
                raise RuntimeError(f"a reward worker failed to start: {detail}")
            w.ready, w.deadline = True, math.inf

    def run(self, samples: list[Any]) -> list[Row]:
        """Rows of (values, failures, timeouts, first error), one per sample, in input order."""
        if not self.workers:  # closed, by close() or after workers kept failing to start
            raise RuntimeError("the reward worker pool is closed")
        rows: list[Row | None] = [None] * len(samples)
        queue: deque[int] = deque(range(len(samples)))
        chunk = max(1, min(_CHUNK, math.ceil(len(samples) / (4 * len(self.workers)))))
        while queue or any(w.todo for w in self.workers):
            self._dispatch(queue, samples, chunk, rows)
            self._collect(rows, queue)
        return rows  # type: ignore[return-value]

    def _dispatch(self, queue: deque[int], samples: list[Any], chunk: int, rows: list) -> None:
        for w in list(self.workers):
            if not queue or not w.ready or w.todo:
                continue
            indices = [queue.popleft() for _ in range(min(chunk, len(queue)))]
            try:
                message = pickle.dumps([(i, samples[i]) for i in indices])
            except Exception:  # some sample does not pickle: find it, fail it alone, send the rest
                indices = self._fail_unpicklable(indices, samples, rows)
                if not indices:
                    continue
                message = pickle.dumps([(i, samples[i]) for i in indices])
            try:
                w.conn.send_bytes(message)
            except OSError:  # it died while idle: nothing of this chunk ran
                queue.extendleft(reversed(indices))
                self._lose(w, rows, queue, "died while idle")
                continue
            w.todo.extend(indices)
            w.deadline = time.monotonic() + self._deadline_s

    def _fail_unpicklable(self, indices: list[int], samples: list[Any], rows: list) -> list[int]:
        """The indices whose samples pickle; the others score 0 as failures (never here, in-process)."""
        kept = []
        for i in indices:
            try:
                pickle.dumps(samples[i])
            except Exception as e:
                rows[i] = ([0.0] * self._width, 1, 0, f"sample {i}: cannot be sent to a reward worker "
                                                      f"({type(e).__name__}: {e})"[:500], {})
                continue
            kept.append(i)
        return kept

    def _collect(self, rows: list, queue: deque[int]) -> None:
        active = [w for w in self.workers if w.todo or not w.ready]
        if not active:
            return
        timeout = max(0.0, min(w.deadline for w in active) - time.monotonic())
        by_conn = {w.conn: w for w in active}
        for conn in wait(list(by_conn), timeout=timeout):
            self._drain(by_conn[conn], rows, queue)
        now = time.monotonic()
        for w in active:
            if w in self.workers and now >= w.deadline and not w.conn.poll():
                self._lose(w, rows, queue, "timeout")

    def _drain(self, w: _Worker, rows: list, queue: deque[int]) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg == _READY:
                    w.ready, w.deadline = True, math.inf
                    self._start_failures = 0
                elif isinstance(msg, tuple) and msg[0] == "error":
                    self._lose(w, rows, queue, f"failed ({msg[1]})")
                    return
                else:
                    rows[msg[0]] = msg[1]
                    w.todo.popleft()
                    w.deadline = time.monotonic() + self._deadline_s if w.todo else math.inf
        except (EOFError, OSError):
            w.proc.join(timeout=1)  # for its exit code
            self._lose(w, rows, queue, f"died (exit code {w.proc.exitcode})")

    def _lose(self, w: _Worker, rows: list, queue: deque[int], why: str) -> None:
        """Kill w; its current sample scores 0 (a time-out or a failure), the rest are queued again;
        a new worker takes its place."""
        w.kill()
        self.workers.remove(w)
        if not w.ready:  # a replacement that never started
            self._start_failures += 1
            log.error("a reward worker %s while starting (%d in a row)", why, self._start_failures)
            if self._start_failures >= MAX_START_FAILURES:
                self.close()
                raise RuntimeError(f"reward workers keep failing to start ({MAX_START_FAILURES} in a row, the "
                                   f"last {why}); scoring in the trainer's process would have no hard deadline")
            self.workers.append(_Worker(self._ctx, self._spec))
            return
        if w.todo:
            stuck = w.todo.popleft()
            hung = why == "timeout"
            msg = (f"sample {stuck}: worker killed after {self._deadline_s:.1f}s without an answer" if hung
                   else f"sample {stuck}: the reward worker {why}")
            rows[stuck] = ([0.0] * self._width, int(not hung), int(hung), msg, {})
            queue.extendleft(reversed(w.todo))
        self.workers.append(_Worker(self._ctx, self._spec))

    def close(self) -> None:
        """Ask every worker to stop, then kill the ones that do not."""
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()
        self.workers = []
