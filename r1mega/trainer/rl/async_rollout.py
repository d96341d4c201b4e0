"""Asynchronous rollouts, the trainer's side: workers generate the next steps' groups while the
trainer trains on this step's.

The trainer's first rank (the controller) runs a pool of workers: native-engine processes
(r1mega/rollout/workers.py) or lanes to SGLang engines (r1mega/rollout/sglang/lanes.py). It sends
them requests as the ledger allows (r1mega/rollout/ledger.py: the staleness gate and check, what a
checkpoint keeps), gathers their scored results, and shares each step's with every trainer rank,
which takes its data-parallel share.

Weights go out every `weight_sync_every` steps: every trainer rank takes part in gathering them to
HF names (the converter's plan, as for SGLang); the controller copies them and the pool's push
thread sends them, so training goes on while the workers take them.

A worker that exits, raises, or shows no sign of life for `worker_timeout_s` (then it is killed) is
lost. By default that stops the run: every trainer rank raises RolloutWorkerError (the run loop
saves a checkpoint of the last finished step first), and no rank is left in a collective. With
`on_worker_failure=continue` the requests it held go to the others (each worker holds at most two,
so the controller always knows which) and the bridge regroups without it (r1mega/rollout/weights.py);
the run stops only when no worker is left. SGLang engines share one weight-update group, so a lost
engine always stops the run.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mp_connection
import os
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors
from r1mega.config.schema import R1Config
from r1mega.rollout.ledger import RequestLedger, Result, staleness_metrics
from r1mega.rollout.types import Rollouts
from r1mega.rollout.workers import ProcessWorkers, WorkerLost
from r1mega.trainer.run import AbortRun

log = logging.getLogger(__name__)


class RolloutWorkerError(AbortRun):
    """A rollout worker died, hung or raised, or a weight push failed; raised on every trainer rank."""


class AsyncRollout:
    """On every trainer rank; the first one (the controller) runs the workers."""

    def __init__(self, cfg: R1Config, chunks, train_records: list, tokenizer_path: str, sglang=None):
        """`sglang`: the run's SGLang engine (servers and weight transport) when rollout.engine=sglang."""
        self.cfg, self.chunks, self.sglang = cfg, chunks, sglang
        a = cfg.rollout.asynchronous
        self.per_request = a.prompts_per_request or cfg.data.prompts_per_step
        self.controller = dist.get_rank() == 0
        self.plan = None
        self.started = False
        self.trained = 0  # steps trained on so far
        self.threads = _share_cores(a.workers if sglang is None else 0)
        if not self.controller:
            return
        self.ledger = RequestLedger(train_records, cfg.data.prompts_per_step, self.per_request, cfg.data.seed,
                                    cfg.trainer.seed * 1000, cfg.algorithm.max_staleness,
                                    cfg.algorithm.stale_samples, cfg.trainer.steps)
        self.busy_s, self.window_start = 0.0, time.monotonic()
        self.backlog, self.lost = [], 0
        try:
            self.pool = _make_pool(cfg, tokenizer_path, self.threads, sglang)
        except WorkerLost as e:
            raise RolloutWorkerError(str(e)) from None
        self.alive, self.held = set(range(self.pool.size)), {i: [] for i in range(self.pool.size)}
        log.info("async rollout: max_staleness %d", cfg.algorithm.max_staleness)

    # -- the step's side ----------------------------------------------------------------------

    def next_batch(self, step: int) -> Tuple[list, Rollouts, torch.Tensor, Dict[str, torch.Tensor], int, int,
                                             Dict[str, int], Dict[str, float]]:
        """This data-parallel rank's share of step `step`'s groups: (records, rollouts, total rewards,
        components, failures, timeouts, code test outcomes, metrics). Collective over the trainer's ranks."""
        if not self.started:
            self.trained = step - 1
            self.push(step - 1)
            self.started = True
        payload, crash = None, None
        if self.controller:
            try:
                payload = ("ok", self._collect(step))
            except RolloutWorkerError as e:
                payload = ("error", str(e))
            except Exception as e:  # told to every rank too, so none waits in the broadcast below
                payload, crash = ("crash", f"{type(e).__name__}: {e}"), e
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        kind, body = box[0]
        if kind == "error":
            raise RolloutWorkerError(body)
        if kind == "crash":
            raise crash if crash is not None else RuntimeError(f"the async rollout controller (rank 0) failed: {body}")
        results, metrics = body
        return (*self._my_share(results), metrics)

    def after_update(self, step: int) -> None:
        """The step's groups are trained on; weights go out when due. Collective."""
        self.trained = step
        if self.controller:
            self.ledger.commit()
        every = self.cfg.rollout.asynchronous.weight_sync_every
        if step % every == 0 and step < self.cfg.trainer.steps:
            self.push(step)

    def push(self, version: int) -> None:
        """Gather the weights to HF names (every rank takes part) and hand a copy to the push thread."""
        if self.plan is None:
            # workers decode without multi-token prediction: its layers stay here
            self.plan = make_plan(self.chunks, self.cfg.model, decoder_only=True)
        # sent to the controller alone (nothing arrives elsewhere); a copy: the next optimizer step
        # changes the parameters in place
        device = self.pool.push_device if self.controller else None
        tensors = {name: t.detach().to(device, copy=True)
                   for name, t in world_hf_tensors(self.chunks, self.cfg.model, self.plan, dst=0)}
        if self.controller:
            self.pool.pusher.push(version, tensors)

    def _my_share(self, results: List[Result]):
        """The step's prompts split over data-parallel ranks in contiguous shares, as the synchronous
        sampler splits them."""
        dp, me = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        prompts = [(res, p) for res in results for p in range(len(res.records))]
        share = len(prompts) // dp
        parts, records, totals, comps = [], [], [], {}
        for res, p in prompts[me * share:(me + 1) * share]:
            rows = [i for i, g in enumerate(res.rollouts.group_index) if g == p]
            parts.append(res.rollouts.select(rows))
            records += [res.records[p]] * len(rows)
            totals += [res.total[i] for i in rows]
            for name, values in res.components.items():
                comps.setdefault(name, []).extend(values[i] for i in rows)
        # the step's reward failures and time-outs, counted once (the metrics sum them over ranks)
        failures = sum(res.failures for res in results) if me == 0 else 0
        timeouts = sum(res.timeouts for res in results) if me == 0 else 0
        tests: Counter = Counter()
        for res in results if me == 0 else []:
            tests.update(res.code_tests)
        return (records, Rollouts.concat(parts), torch.tensor(totals, dtype=torch.float64),
                {k: torch.tensor(v, dtype=torch.float64) for k, v in comps.items()}, failures, timeouts, dict(tests))

    # -- the controller ---------------------------------------------------------------------------

    def _collect(self, step: int) -> Tuple[List[Result], Dict[str, float]]:
        """The step's results (the ledger's choice), waiting for workers as long as it takes."""
        waited = time.monotonic()
        while True:
            self.backlog += self.ledger.to_submit(self.pool.pusher.announced, self.trained)
            chosen, again = self.ledger.take(step)
            self.backlog += again
            self._dispatch()
            if chosen is not None:
                return chosen, self._metrics(step, chosen, time.monotonic() - waited)
            self._drain(timeout=0.05)
            self._check()

    def _dispatch(self) -> None:
        """Requests in order to the live workers, each holding at most two (one running, one next), the
        least loaded first: the controller always knows which requests a worker holds."""
        while self.backlog:
            free = [i for i in sorted(self.alive) if len(self.held[i]) < 2]
            if not free:
                return
            worker = min(free, key=lambda i: len(self.held[i]))
            request = self.backlog.pop(0)
            self.held[worker].append(request.id)
            self.pool.send(worker, request)

    def _drain(self, timeout: float, only: Optional[int] = None) -> None:
        """Take in what the live workers (or worker `only`) have sent, waiting up to `timeout` for the first."""
        pipes = self.pool.connections(self.alive if only is None else {only})
        while pipes:
            ready = mp_connection.wait(list(pipes), timeout)
            if not ready:
                return
            timeout = 0.0
            for conn in ready:
                i = pipes[conn]
                try:
                    item = conn.recv()
                except (EOFError, OSError):  # it exited (a kill may also leave half a message): _check says how
                    del pipes[conn]
                    continue
                if isinstance(item, tuple) and item[0] == "error":
                    del pipes[conn]
                    if i in self.alive:
                        self._lost(i, f"{self.pool.name(i)} failed: {_last_line(item[2])}\n{item[2]}")
                    continue
                if item.request in self.held[item.worker]:
                    self.held[item.worker].remove(item.request)
                self.ledger.finished(item)
                self.busy_s += item.generate_s + item.score_s

    def _check(self) -> None:
        """Every live worker running and beating; the push thread healthy."""
        timeout = self.cfg.rollout.asynchronous.worker_timeout_s
        now = time.monotonic()
        for i in sorted(self.alive):
            gone = self.pool.exited(i)
            if gone is not None:
                self._drain(timeout=0.5, only=i)  # its traceback, if it sent one
                if i in self.alive:
                    self._lost(i, f"{self.pool.name(i)} {gone}")
            elif now - self.pool.last_beat(i) > timeout:
                silent = now - self.pool.last_beat(i)
                self.pool.kill(i)
                self._lost(i, f"{self.pool.name(i)} showed no sign of life for {silent:.0f} s "
                              f"(rollout.asynchronous.worker_timeout_s={timeout:g}); it was killed")
        if self.pool.pusher.error is not None:
            raise RolloutWorkerError(f"a weight push to the rollout workers failed: {self.pool.pusher.error}")

    def _lost(self, index: int, why: str) -> None:
        """A worker is gone: stop the run, or (on_worker_failure=continue, others left) send its requests to
        the others and regroup the bridge without it."""
        self.alive.discard(index)
        self.pool.kill(index)
        if self.cfg.rollout.asynchronous.on_worker_failure == "stop" or not self.alive:
            raise RolloutWorkerError(why if self.alive or self.pool.size == 1 else f"{why}; no worker is left")
        self.lost += 1
        log.warning("%s; going on with %d worker(s)", why, len(self.alive))
        self.backlog[:0] = self.ledger.out(self.held[index])
        self.held[index] = []
        self.pool.regroup(self.alive)

    def _metrics(self, step: int, chosen: List[Result], waited: float) -> Dict[str, float]:
        """Staleness of the step's samples, groups over the bound, and how busy each side was."""
        now = time.monotonic()
        window, self.window_start = now - self.window_start, now
        workers = len(self.alive)
        versions = [v for res in chosen for v in res.rollouts.versions]
        out = {**staleness_metrics(step, versions, self.cfg.algorithm.max_staleness),
               "async/over_bound": float(self.ledger.over_bound), "async/first_request": float(chosen[0].request),
               "async/trainer_wait_s": waited, "async/workers_alive": float(len(self.alive)),
               "async/workers_lost": float(self.lost),
               "async/rollout_busy_share": min(1.0, self.busy_s / max(window * workers, 1e-9))}
        self.busy_s = 0.0
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The controller's ledger: the prompt stream and the requests not yet trained on."""
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.controller and state:
            self.ledger.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers (the pool's own way), and SGLang's servers (every rank: each stops its own)."""
        if self.controller:
            self.pool.close(self.alive)
        if self.sglang is not None:
            self.sglang.shutdown()


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else text


def _make_pool(cfg: R1Config, tokenizer_path: str, threads: int, sglang):
    """The rollout workers: native-engine processes, or lanes to SGLang engines."""
    if sglang is not None:
        from r1mega.rollout.sglang.lanes import SGLangLanes

        return SGLangLanes(cfg, sglang, tokenizer_path, ps.get_data_parallel_world_size())
    return ProcessWorkers(cfg, tokenizer_path, threads)


def _share_cores(workers: int) -> int:
    """Intra-op threads per process on the first host, whose cores the trainer's local ranks share with
    the rollout workers; the workers take the same number."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    threads = max(1, (os.cpu_count() or 1) // (local + workers))
    if dist.get_rank() < local and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return threads
