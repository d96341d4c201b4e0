"""The native engine's asynchronous rollout workers, seen from the trainer's first rank: processes of
their own (r1mega/rollout/worker.py) with a request queue and a result pipe each, a heartbeat, and a
weight bridge shared with the trainer (r1mega/rollout/weights.py).

The async controller (r1mega/trainer/rl/async_rollout.py) drives any pool with this shape:
`size`, `send`, `connections`, `name`, `exited`, `last_beat`, `kill`, `regroup`, `pusher`, `close`;
r1mega/rollout/sglang/lanes.py is the other one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import os
from typing import Dict, Iterable, Optional

import torch.distributed as dist

from r1mega.config.schema import R1Config
from r1mega.platform.bridge import Bridge
from r1mega.platform.distributed import rollout_worker_devices
from r1mega.platform.env import free_port
from r1mega.platform.launch import preload_modules
from r1mega.rollout.ledger import Request
from r1mega.rollout.weights import Pusher
from r1mega.rollout.worker import WorkerSpec, worker_main

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A rollout worker (or engine) is gone, or a weight push failed; the message names it."""


class ProcessWorkers:
    def __init__(self, cfg: R1Config, tokenizer_path: str, threads: int):
        a = cfg.rollout.asynchronous
        self.size = a.workers
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(preload_modules())
        self.inboxes = [ctx.Queue() for _ in range(a.workers)]
        self.pipes, ends = zip(*[ctx.Pipe(duplex=False) for _ in range(a.workers)])
        port, size = free_port(), a.workers + 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        devices, backend = rollout_worker_devices(local, a.workers)
        self.beats = [ctx.Value("d", time.monotonic(), lock=False) for _ in range(a.workers)]
        specs = [WorkerSpec(index=i, cfg=cfg, tokenizer_path=str(tokenizer_path), bridge_port=port,
                            bridge_size=size, world_port=free_port(), threads=threads,
                            device=devices[i], backend=backend, requests=self.inboxes[i], results=ends[i],
                            heartbeat=self.beats[i]) for i in range(a.workers)]
        self.procs = [ctx.Process(target=worker_main, args=(spec,), name=f"r1mega-rollout-{spec.index}")
                      for spec in specs]
        try:
            for p in self.procs:
                p.start()
            for end in ends:  # the workers hold the sending ends: an exit then reads as the end of its pipe
                end.close()
            self.bridge = self._join_bridge(port, size, backend, a.worker_timeout_s)
        except BaseException:  # no worker outlives a failed start
            self._kill_all()
            raise
        self.push_device = self.bridge.device
        self.pusher = Pusher(self.bridge, a.worker_timeout_s)
        self.pusher.start()
        log.info("async rollout: %d worker(s) (pids %s)", a.workers, ", ".join(str(p.pid) for p in self.procs))

    def _join_bridge(self, port: int, size: int, backend: str, timeout_s: float) -> Bridge:
        """The trainer's end of the bridge, joined while watching the workers start: one lost at start-up
        leaves the bridge short, so it stops the run whatever the failure policy."""
        box: dict = {}

        def join():
            try:
                box["bridge"] = Bridge("127.0.0.1", port, 0, size, backend=backend, timeout_s=timeout_s)
            except BaseException as e:  # reported by the waiting thread below
                box["error"] = e

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        while joiner.is_alive():
            joiner.join(0.2)
            for b in self.beats:  # start-up (imports, model) is not a hang
                b.value = time.monotonic()
            for i, p in enumerate(self.procs):
                if not p.is_alive():
                    error = self._traceback(i)
                    raise WorkerLost(f"{self.name(i)} exited with code {p.exitcode} while starting"
                                     + (f":\n{error}" if error else ""))
        if "error" in box:
            raise WorkerLost(f"the rollout workers did not join the weight bridge: {box['error']}")
        return box["bridge"]

    def _traceback(self, i: int) -> str:
        if self.pipes[i].poll(0.5):
            try:
                item = self.pipes[i].recv()
                if isinstance(item, tuple) and item[0] == "error":
                    return item[2]
            except (EOFError, OSError):
                pass
        return ""

    # -- what the controller calls --------------------------------------------------------------

    def send(self, i: int, request: Request) -> None:
        self.inboxes[i].put(request)

    def connections(self, which: Iterable[int]) -> Dict:
        """Result pipe -> worker, for these workers: each sends Result or ("error", index, traceback)."""
        return {self.pipes[i]: i for i in which}

    def name(self, i: int) -> str:
        return f"rollout worker {i} (pid {self.procs[i].pid})"

    def exited(self, i: int) -> Optional[str]:
        """Why worker i is gone, or None while it runs."""
        p = self.procs[i]
        return None if p.is_alive() else f"exited with code {p.exitcode}"

    def last_beat(self, i: int) -> float:
        return self.beats[i].value

    def kill(self, i: int) -> None:
        if self.procs[i].is_alive():
            self.procs[i].kill()

    def regroup(self, members) -> None:
        self.pusher.regroup(sorted(members))

    def close(self, alive: Iterable[int]) -> None:
        """A stop request to each live worker, then a kill for any still running after a grace period."""
        for i in alive:
            self.inboxes[i].put(None)
        self.pusher.stop()
        deadline = time.monotonic() + 30
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self._kill_all()

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
