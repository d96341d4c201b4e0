"""Asynchronous rollouts on SGLang engines on GPUs of their own (rollout.sglang.mode=disaggregated),
seen from the trainer's first rank: the pool the async controller drives (r1mega/trainer/rl/async_rollout.py;
the native engine's is r1mega/rollout/workers.py).

Each engine is a lane. A request from the controller runs on a thread of this process as one
/generate call (each row its own request with its own seed, as the synchronous engine sends them), and
the reward stack here scores it. Weights go out from a push thread over the engines' weight-update
group (the synchronous engine's transport), inside a begin/end session, with the policy version as
SGLang's weight_version. How a push meets generation, as SGLang 0.5.23 behaves:

- Without partial rollouts a push waits until none of our requests runs, and a request waits for every
  announced push: each sample comes from one version. (Unpaused, SGLang's own update takes a writer
  lock that waits for running requests, but it lets go between the session's calls.)
- With partial rollouts a push pauses the engines with /pause_generation mode=retract (running requests
  give up their KV cache and keep their tokens), updates, flushes the prefix cache and continues: the
  requests go on under the new weights with their KV computed again, and SGLang reports at which output
  position each version starts (meta_info weight_versions), which become the rows' per-token versions.
  mode=in_place (keep the KV) is not used: its cache flush is refused while requests run, so the prefix
  cache would give later requests KV computed by the old weights.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
import traceback
from typing import Dict, Iterable, Optional

import torch

from r1mega.config.schema import R1Config
from r1mega.data.tokenizer import load_tokenizer
from r1mega.rollout.ledger import Request, Result
from r1mega.rollout.setup import make_reward_stack, reward_inputs, sampling_params
from r1mega.rollout.sglang.buckets import buckets
from r1mega.rollout.sglang.engine import (SGLangEngine, parse_outputs, routed_experts, sample_seeds, sampling_payload,
                                          token_versions)
from r1mega.rollout.types import Rollouts

log = logging.getLogger(__name__)


class SGLangPusher(threading.Thread):
    """Sends weight snapshots to every engine, newest first, and tells lanes when they may start."""

    def __init__(self, engine: SGLangEngine, partial: bool):
        super().__init__(name="r1mega-sglang-push", daemon=True)
        self.engine, self.partial = engine, partial
        self.cond = threading.Condition()
        self.waiting: Optional[tuple] = None
        self.announced = -1  # the newest version announced (the ledger's gate reads it)
        self.pushes = 0  # announced so far
        self.delivered = 0  # of those, in the engines
        self.running = 0  # our requests in the engines now
        self.error: Optional[BaseException] = None
        self.stopping = False

    def push(self, version: int, tensors: dict) -> None:
        with self.cond:
            self.waiting = (version, tensors)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # -- the lanes' side --------------------------------------------------------------------------

    def enter(self) -> None:
        """Before a request: every announced push delivered (and one at least: the engines start with
        dummy weights)."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or (self.pushes and self.delivered == self.pushes))
            self.running += 1

    def leave(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()

    # -- the push thread --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.waiting is not None or self.stopping)
                    if self.stopping:
                        return
                    (version, tensors), self.waiting = self.waiting, None
                    self.pushes += 1
                    self.announced = version
                    if not self.partial:  # the samples running finish under the weights they started with
                        self.cond.wait_for(lambda: self.running == 0 or self.stopping)
                    if self.stopping:
                        return
                self._send(version, tensors)
                with self.cond:
                    self.delivered += 1
                    self.cond.notify_all()
        except BaseException as e:  # the controller reports it at its next check
            self.error = e
            with self.cond:
                self.cond.notify_all()

    def _send(self, version: int, tensors: dict) -> None:
        engine, start = self.engine, time.perf_counter()
        if self.partial:
            for c in engine.clients:
                c.pause_generation("retract")
        try:
            for c in engine.clients:
                c.begin_weight_update()
            for bucket in buckets(tensors.items(), engine.bucket_bytes):
                if self.stopping:  # the run ends: the engines are stopped next
                    return
                engine.transport.send(bucket, str(version))
            engine.transport.finish()
            for c in engine.clients:
                c.end_weight_update()
                c.flush_cache()  # the prefix cache holds KV of the old weights
        finally:
            if self.partial:  # also after a failure, so no request waits out its time-out in a paused engine
                for c in engine.clients:
                    try:
                        c.continue_generation()
                    except Exception as e:
                        log.warning("%s: /continue_generation failed: %s", c.url, e)
        log.debug("weights of version %d in the engines after %.2f s", version, time.perf_counter() - start)


class SGLangLanes:
    """The SGLang engines as the async controller's worker pool (see the module docstring)."""

    def __init__(self, cfg: R1Config, engine: SGLangEngine, tokenizer_path: str, data_parallel: int):
        self.engine, self.size, self.dp = engine, len(engine.clients), data_parallel
        self.decode = load_tokenizer(tokenizer_path).decode
        self.rewards, _ = make_reward_stack(cfg)
        self.score_lock = threading.Lock()  # one scoring at a time: the stack's worker pool is not shared
        self.n = cfg.algorithm.group_size
        self.payload = sampling_payload(sampling_params(cfg), 1, engine.stop_token_ids)
        self.inboxes = [queue.Queue() for _ in range(self.size)]
        self.pipes, self.ends = zip(*[mp.Pipe(duplex=False) for _ in range(self.size)])
        self.send_locks = [threading.Lock() for _ in range(self.size)]
        self.beats = [time.monotonic()] * self.size
        self.push_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.pusher = SGLangPusher(engine, cfg.rollout.asynchronous.partial)
        self.pusher.start()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._lane, args=(i,), name=f"r1mega-sglang-lane-{i}", daemon=True)
                        for i in range(self.size)]
        self.threads.append(threading.Thread(target=self._watch, name="r1mega-sglang-health", daemon=True))
        for t in self.threads:
            t.start()
        log.info("async rollout: %d SGLang engine(s): %s", self.size, ", ".join(c.url for c in engine.clients))

    # -- what the controller calls --------------------------------------------------------------

    def send(self, i: int, request: Request) -> None:
        self.inboxes[i].put(request)

    def connections(self, which: Iterable[int]) -> Dict:
        return {self.pipes[i]: i for i in which}

    def name(self, i: int) -> str:
        return f"SGLang engine {i} ({self.engine.clients[i].url})"

    def exited(self, i: int) -> Optional[str]:
        """Why engine i is gone (its server process exited), or None."""
        procs = self.engine.processes
        code = procs[i].proc.poll() if i < len(procs) else None
        return None if code is None else f"exited with code {code} (server log: {procs[i].log_path})"

    def last_beat(self, i: int) -> float:
        return self.beats[i]

    def kill(self, i: int) -> None:
        """Stop engine i's server, if this process launched it (a lost engine stops the run: its
        weight-update group cannot drop it)."""
        if i < len(self.engine.processes):
            self.engine.processes[i].stop(grace_s=10)

    def regroup(self, members) -> None:
        raise RuntimeError("SGLang engines share one weight-update group, which cannot drop a member")

    def close(self, alive: Iterable[int]) -> None:
        """Stop the lanes and the push thread; the engine's shutdown (transport, servers) comes after."""
        self.stopping.set()
        for i in range(self.size):
            self.inboxes[i].put(None)
        self.pusher.stop()
        self.pusher.join(timeout=60)  # a bucket in flight ends before the group goes
        if self.pusher.is_alive():
            log.warning("the weight push did not end within 60 s; closing the transport under it")
        for t in self.threads:
            t.join(timeout=5)
        self.rewards.close()

    # -- threads --------------------------------------------------------------------------------

    def _lane(self, i: int) -> None:
        """Requests to engine i, each on a thread of its own: the controller gives a lane at most two,
        and the engine batches whatever runs."""
        while True:
            request = self.inboxes[i].get()
            if request is None:
                return
            threading.Thread(target=self._serve, args=(i, request), daemon=True,
                             name=f"r1mega-sglang-request-{request.id}").start()

    def _serve(self, i: int, request: Request) -> None:
        client = self.engine.clients[i]
        try:
            rows = [list(r.token_ids) for r in request.records for _ in range(self.n)]
            self.pusher.enter()
            try:
                if self.stopping.is_set():
                    return
                start = time.perf_counter()
                e = self.engine
                outputs = client.generate(rows, [{**self.payload, "sampling_seed": s} for s in self._seeds(request)],
                                          e.record_routing)
            finally:
                self.pusher.leave()
            ids, logprobs, reasons = parse_outputs(outputs, client.url)
            routing = routed_experts(outputs, rows, client.url, e.routing_num_layers, e.routing_layers,
                                     e.routing_topk) if e.record_routing else []
            rollouts = Rollouts(rows, ids, logprobs, reasons, [g for g in range(len(request.records))
                                                               for _ in range(self.n)],
                                token_versions(outputs, client.url), routing)
            generated = time.perf_counter()
            records = [request.records[g] for g in rollouts.group_index]
            with self.score_lock:
                scores = self.rewards.score(reward_inputs(records, rollouts, self.decode))
            item = Result(request.id, i, rollouts, scores.total, scores.components, scores.failures,
                          scores.timeouts, generated - start, time.perf_counter() - generated,
                          code_tests=scores.counts)
        except Exception:
            item = ("error", i, traceback.format_exc())
        with self.send_locks[i]:
            self.ends[i].send(item)

    def _seeds(self, request: Request):
        """The synchronous engine's seeds for call number request.id: the request's prompts in contiguous
        data-parallel shares, share r seeded as data-parallel rank r seeds its call (a request of a whole
        step then samples what the synchronous run samples)."""
        prompts = len(request.records)
        parts = self.dp if prompts % self.dp == 0 else 1
        share = prompts // parts
        return [s for r in range(parts) for s in sample_seeds((0, self.engine.seed, request.id), r, share * self.n)]

    def _watch(self) -> None:
        """Each engine's sign of life: an answer to /model_info (once a second)."""
        while not self.stopping.wait(1.0):
            for i, c in enumerate(self.engine.clients):
                try:
                    c.alive()
                    self.beats[i] = time.monotonic()
                except Exception:
                    pass
