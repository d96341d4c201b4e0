"""An asynchronous rollout worker: a process with a world of its own that generates and scores groups
while the trainer trains.

The trainer's first rank starts the workers (r1mega/trainer/rl/async_rollout.py) and hands each
requests (prompts and a sampling seed) over a queue of its own; a worker generates with the native
engine on a one-rank copy of the policy, scores the rows with its own reward stack, and queues the
result with the policy version of every token. Weights arrive over a bridge group (gloo on CPU,
NCCL on GPU; the protocol in r1mega/rollout/weights.py): a worker joins every announced push before
it starts a request, and with partial rollouts also between decode steps.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from r1mega.checkpoint.hf_convert import load_hf_weights
from r1mega.config.schema import ParallelConfig, R1Config
from r1mega.data.tokenizer import load_tokenizer
from r1mega.models.builder import build_model
from r1mega.platform.bridge import Bridge
from r1mega.platform.distributed import destroy, initialize
from r1mega.platform.logs import setup_logging
from r1mega.rollout.ledger import Request, Result
from r1mega.rollout.setup import make_reward_stack, native_engine, record_routing, reward_inputs, sampling_params
from r1mega.rollout.weights import Receiver

log = logging.getLogger(__name__)

@dataclass
class WorkerSpec:
    index: int  # 0-based; its bridge rank is index + 1 (the trainer's first rank is 0)
    cfg: R1Config
    tokenizer_path: str
    bridge_port: int
    bridge_size: int
    world_port: int  # rendezvous of its own one-rank world
    threads: int
    device: Optional[str]  # its CUDA_VISIBLE_DEVICES entry; None on CPU
    backend: str  # the bridge's: nccl when every member has a GPU of its own, else gloo
    requests: Any  # its own queue: Request in (None: stop)
    # its own pipe's sending end: Result or ("error", index, text) out. Nothing is shared with another worker:
    # a worker killed while writing could leave a shared queue's lock held and stall the others
    results: Any
    heartbeat: Any  # an unlocked multiprocessing Value('d') (a kill cannot leave it locked): its latest sign of life


def worker_main(spec: WorkerSpec) -> None:
    """A worker's process: its own world, model, engine and reward stack; requests until told to stop."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(spec.world_port))
    if spec.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.device
    setup_logging()
    try:
        initialize(ParallelConfig(timeout_minutes=spec.cfg.parallel.timeout_minutes), spec.cfg.trainer.seed)
        torch.set_num_threads(spec.threads)
        Worker(spec).run()
    except BaseException:  # the trainer reports it by the worker's name
        try:
            spec.results.send(("error", spec.index, traceback.format_exc()))
        except OSError:  # the trainer is gone
            pass
        raise
    finally:
        destroy()


class Worker:
    def __init__(self, spec: WorkerSpec):
        cfg = spec.cfg
        self.spec, self.cfg = spec, cfg
        self.beat()
        tokenizer = load_tokenizer(spec.tokenizer_path)
        self.decode = tokenizer.decode
        # generation never runs multi-token prediction: the trainer sends the decoder's weights only
        self.model = replace(cfg.model, mtp=None)
        self.chunks = build_model(self.model, ParallelConfig())
        self.engine = native_engine(cfg, self.chunks, tokenizer)
        self.engine.recompute_after_update = cfg.rollout.asynchronous.partial_kv == "recompute"
        if cfg.algorithm.routing_replay == "rollout":  # rows carry their experts back to the trainer
            record_routing(self.engine, self.chunks)
        self.params = sampling_params(cfg)
        self.rewards, self.names = make_reward_stack(cfg)
        timeout = cfg.rollout.asynchronous.worker_timeout_s
        self.bridge = Bridge("127.0.0.1", spec.bridge_port, spec.index + 1, spec.bridge_size, backend=spec.backend,
                             timeout_s=timeout)
        self.weights = Receiver(self.bridge, spec.index, self.load, timeout, self.beat)
        self.beat()

    def beat(self) -> None:
        self.spec.heartbeat.value = time.monotonic()

    def load(self, version: int, tensors: dict) -> None:
        load_hf_weights(self.chunks, self.model, tensors)
        self.engine.version = version

    def between_tokens(self) -> bool:
        self.beat()
        return self.cfg.rollout.asynchronous.partial and self.weights.poll()

    def run(self) -> None:
        self.engine.between_tokens = self.between_tokens
        parent = os.getppid()  # the trainer's forkserver, which ends with the trainer
        try:
            while os.getppid() == parent:
                self.beat()
                self.weights.poll()
                try:
                    request = self.spec.requests.get(timeout=0.05)
                except queue.Empty:
                    continue
                if request is None:
                    return
                self.weights.poll()  # every push announced before the request was queued
                self.spec.results.send(self.serve(request))
        finally:
            self.rewards.close()
            self.bridge.close()

    def serve(self, request: Request) -> Result:
        start = time.perf_counter()
        prompts = [r.token_ids for r in request.records]
        rollouts = self.engine.generate(prompts, replace(self.params, seed=request.seed),
                                        n=self.cfg.algorithm.group_size)
        generated = time.perf_counter()
        records = [request.records[g] for g in rollouts.group_index]
        scores = self.rewards.score(reward_inputs(records, rollouts, self.decode))
        return Result(request.id, self.spec.index, rollouts, scores.total, scores.components, scores.failures,
                      scores.timeouts, generated - start, time.perf_counter() - generated, code_tests=scores.counts)
