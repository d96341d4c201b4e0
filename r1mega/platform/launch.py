"""Start N local ranks of a function on this host (CPU runs, tests), like a minimal torchrun."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal
import threading
import traceback
from typing import Any, Callable, List

import torch

from r1mega.platform.env import free_port
from r1mega.platform.signals import STOP_SIGNALS

PRELOAD = ["torch", "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.dist_checkpointing",
           "r1mega.platform.distributed"]


def preload_modules() -> List[str]:
    """What the forkserver imports before it forks ranks.

    On a CUDA host only torch. torch counts devices through the CUDA driver, and once it has
    (`torch.cuda.is_available()` does, and the preloaded modules ask it at import) it marks
    the process so that a fork of it refuses CUDA: every rank forked from such a server
    failed its first `torch.cuda.set_device` with "Cannot re-initialize CUDA in forked
    subprocess" on an H200 host. GPU ranks import the rest themselves; seconds are nothing
    beside a GPU run.
    """
    return PRELOAD if not torch.cuda.is_available() else ["torch"]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        # Results travel as torch.save bytes: torch's shared-memory tensor pickling would
        # hand over file descriptors that die with this process.
        buf = io.BytesIO()
        torch.save(fn(*args), buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure, then let the parent raise it
        queue.put((rank, False, traceback.format_exc()))


def spawn(nproc: int, fn: Callable[..., Any], *args: Any, timeout: float = 900.0) -> List[Any]:
    """Run fn(*args) on nproc ranks; return each rank's result, or raise the first failure.

    Ranks fork from a forkserver that has imported torch and megatron-core once (they take
    seconds to import); a plain fork of a parent that already ran torch's OpenMP thread
    pool can deadlock in the child's first parallel matmul. fn must be picklable.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload_modules())
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, fn, args, queue)) for r in range(nproc)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures = []
    previous = _forward_stop_signals(procs)
    try:
        for _ in range(nproc):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                failures.append((rank, value))
                break
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failures:
        rank, tb = failures[0]
        raise RuntimeError(f"rank {rank} of {nproc} failed:\n{tb}")
    return [results[r] for r in range(nproc)]


def _forward_stop_signals(procs) -> dict:
    """Pass the stop signals sent to this launcher on to its ranks (they checkpoint and stop)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum, frame):
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    return {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
