"""The SGLang rollout engine: generation over HTTP, bucketed weight sync, memory release and resume.

Every trainer rank holds one SGLangEngine. Engine owners (topology.py) launch the servers and
drive their memory and weight-update sessions; data-parallel leaders send prompts; everything
else is collective, so every rank calls every method in the same order.
"""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.platform.distributed import collectively, replica_group
from r1mega.rollout.sglang.buckets import buckets
from r1mega.rollout.sglang.client import ALL_TAGS, SGLangClient, SGLangError
from r1mega.rollout.sglang.topology import Topology, engines_for, split_even
from r1mega.rollout.types import Rollouts, SamplingParams

FINISH = {"stop": "stop", "length": "length"}


def sampling_payload(params: SamplingParams, n: int, stop_token_ids: Sequence[int], ignore_eos: bool = False) -> dict:
    """SGLang's sampling_params for `params` (its schema refuses unknown keys and float counts);
    each request's sampling_seed is added by the engine."""
    return {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(params.top_k),
            "max_new_tokens": int(params.max_new_tokens), "n": int(n), "ignore_eos": ignore_eos,
            "stop_token_ids": [] if ignore_eos else sorted(set(stop_token_ids) | set(params.stop_token_ids)),
            "no_stop_trim": True}


def sample_seeds(key: Tuple[int, ...], data_rank: int, count: int) -> List[int]:
    """A distinct sampling_seed for each of `count` requests: splitmix64 over the key, the
    data-parallel rank and the request's index, kept in int64's positive range. A server in
    deterministic-inference mode draws each token from a hash of (seed, position) alone, and
    uses 42 for a request without one: the samples of a group would all be the same."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state = 0
    for part in (*key, data_rank):
        state = mix(state ^ (part & mask))
    return [mix(state ^ i) >> 1 for i in range(count)]


def parse_outputs(outputs: List[dict], url: str) -> Tuple[List[List[int]], List[List[float]], List[str]]:
    """(response ids, their log-probs, finish reasons) of SGLang's /generate outputs."""
    ids, logprobs, reasons = [], [], []
    for out in outputs:
        try:
            meta = out["meta_info"]
            kind = (meta.get("finish_reason") or {}).get("type")
            tokens = [int(t) for t in out["output_ids"]]
            lps = [float(entry[0]) for entry in meta["output_token_logprobs"]]  # null (NaN, -inf) fails here
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SGLangError(f"{url}/generate: malformed output ({type(err).__name__}: {err})") from None
        if kind not in FINISH:
            raise SGLangError(f"{url}/generate: a request ended with finish_reason={meta.get('finish_reason')}")
        if len(lps) != len(tokens):
            raise SGLangError(f"{url}/generate: {len(tokens)} output ids but {len(lps)} log-probs")
        ids.append(tokens)
        logprobs.append(lps)
        reasons.append(FINISH[kind])
    return ids, logprobs, reasons


def routed_experts(outputs: List[dict], prompts: List[List[int]], url: str, num_layers: int, layers: List[int],
                   topk: int) -> List[torch.Tensor]:
    """Each output's routing [len - 1, M, k] (int16) from meta_info routed_experts: SGLang 0.5.23 sends
    base64 of int32 [prompt + output - 1, num_hidden_layers, k] (state_capturer/routed_experts.py), dense
    layers 0; `layers` are the MoE layers' indices among the num_layers."""
    out = []
    for o, prompt in zip(outputs, prompts):
        encoded = o["meta_info"].get("routed_experts")
        if encoded is None:
            raise SGLangError(f"{url}/generate: no routed_experts in meta_info; was the server started with "
                              "--enable-return-routed-experts?")
        positions = len(prompt) + len(o["output_ids"]) - 1
        try:
            raw = base64.b64decode(encoded)
        except ValueError as err:
            raise SGLangError(f"{url}/generate: routed_experts is not base64 ({err})") from None
        if positions < 1 or len(raw) != 4 * positions * num_layers * topk:
            raise SGLangError(f"{url}/generate: routed_experts of {len(raw)} bytes is not int32 [{positions} "
                              f"positions, {num_layers} layers, {topk}]")
        experts = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(positions, num_layers, topk)
        out.append(experts[:, layers].to(torch.int16))
    return out


def token_versions(outputs: List[dict], url: str) -> List[List[int]]:
    """The weight version that sampled each output token, from meta_info: `weight_versions`, spans
    [{"version", "start", "end"}] over output positions that SGLang 0.5.23 adds to every finished request
    (split where an update changed weight_version mid-request), else `weight_version` for all of them."""
    out = []
    for o in outputs:
        meta, length = o["meta_info"], len(o["output_ids"])
        try:
            spans = meta.get("weight_versions") or [{"version": meta["weight_version"], "start": 0, "end": length}]
            versions = [-1] * length
            for span in spans:
                versions[int(span["start"]):int(span["end"])] = [int(span["version"])] * (int(span["end"]) -
                                                                                         int(span["start"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SGLangError(f"{url}/generate: no usable weight version in meta_info ({type(err).__name__}: {err}); "
                              f"weight_version={meta.get('weight_version')!r}") from None
        if len(versions) != length or -1 in versions:
            raise SGLangError(f"{url}/generate: weight_versions {spans} do not cover the {length} output tokens")
        out.append(versions)
    return out


def in_background(fn: Callable, *args) -> Future:
    """fn(*args) on a daemon thread: a run that fails with requests out exits without waiting for them
    (an executor's threads would be joined at exit, up to the client's time-out)."""
    future: Future = Future()

    def call():
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - raised again where the result is read
            future.set_exception(err)

    threading.Thread(target=call, name="sglang-request", daemon=True).start()
    return future


@dataclass
class Pending:
    """A generation in flight (SGLangEngine.submit): its prompts, and the leader's requests."""

    prompts: List[List[int]]
    n: int
    future: Optional[Future]  # on the group's leader, which sends the requests; None elsewhere


class SGLangEngine:
    """RolloutEngine over SGLang servers; `transport` sends weight buckets (IPC or NCCL)."""

    def __init__(self, topology: Topology, clients: List[SGLangClient], transport, stop_token_ids: Sequence[int],
                 bucket_bytes: int, memory_saver: bool, processes: Sequence = (), weights_backup: bool = False,
                 seed: int = 0):
        self.topology = topology
        self.clients = clients
        self.transport = transport
        self.processes = list(processes)  # the servers this rank launched
        self.ignore_eos = False  # benchmarks decode exactly max_new_tokens
        self.stop_token_ids = tuple(stop_token_ids)
        self.bucket_bytes = bucket_bytes
        self.memory_saver = memory_saver
        # SGLang releases `weights` without a copy unless it runs with --enable-weights-cpu-backup:
        # after a release and resume they are garbage (only buffers are restored) until synced again
        self.weights_backup = weights_backup
        self.weights_lost = False
        self.seed = seed
        self._calls = 0  # unseeded generate calls: each draws new sampling seeds
        self.version = 0  # weight version: syncs so far
        self.resident: List[str] = list(ALL_TAGS)  # what the engines hold on the GPU now
        self.last_sync: Dict[str, float] = {}
        self._rank = dist.get_rank()
        self._owned = [self.clients[e] for e in topology.owned_engines(self._rank)]
        self._pending = None  # the submit() not yet collected
        # MoE routing replay (algorithm.routing_replay=rollout): each row carries its routing, for the MoE
        # layers `routing_layers` (0-based decoder layers) of top-k `routing_topk`
        self.record_routing = False
        self.routing_num_layers = 0
        self.routing_layers: List[int] = []
        self.routing_topk = 0

    # -- generation ------------------------------------------------------------------------

    def generate(self, prompts: List[List[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        """n samples of each prompt from this data-parallel group's engines, shared with the group.
        Collective over the world: a failed request raises on every rank."""
        return self.collect(self.submit(prompts, params, n))

    def submit(self, prompts: List[List[int]], params: SamplingParams, n: int = 1) -> Pending:
        """Start a generate() call in the background and return at once: the group's leader sends the
        requests from a thread while this rank goes on (scoring, the trainer's forward passes).
        The seeds are drawn now, so the samples are those of a generate() call in this place."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self._pending is not None:
            raise RuntimeError("a generation is already in flight; collect() it first")
        # seeded calls (evaluation) are reproducible and leave the training stream alone
        key = (1, params.seed) if params.seed is not None else (0, self.seed, self._calls)
        self._calls += params.seed is None
        future = None
        if dist.get_rank(replica_group()) == 0:
            future = in_background(self._request, prompts, params, n, key)
        self._pending = Pending([list(p) for p in prompts], n, future)
        return self._pending

    def collect(self, pending: Pending) -> Rollouts:
        """The rollouts of a submit(), once its requests are done, shared with the group. Collective
        over the world: a failed request raises on every rank."""
        if pending is not self._pending:
            raise RuntimeError("collect() takes the generation in flight, from this engine's submit()")
        self._pending = None
        group = replica_group()
        box: list = [None]
        with collectively():
            if pending.future is not None:
                box[0] = pending.future.result()
        if dist.get_world_size(group) > 1:
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        ids, logprobs, reasons, routing = box[0]
        n = pending.n
        rows = [p for p in pending.prompts for _ in range(n)]
        return Rollouts(rows, ids, logprobs, reasons, [i for i in range(len(pending.prompts)) for _ in range(n)],
                        routing=routing)

    def _request(self, prompts, params, n, key: Tuple[int, ...]):
        """Each engine gets whole groups; a group's n rows go as n requests of one sample, so
        SGLang's prefix cache shares the prompt without its serial per-prompt warm-up of n > 1.
        Every request has a seed of its own."""
        rank = ps.get_data_parallel_rank()
        mine = engines_for(rank, ps.get_data_parallel_world_size(), len(self.clients))
        payload = sampling_payload(params, 1, self.stop_token_ids, self.ignore_eos)
        seeds = iter(sample_seeds(key, rank, len(prompts) * n))
        parts = [(self.clients[e], [prompts[i] for i in r for _ in range(n)],
                  [{**payload, "sampling_seed": next(seeds)} for _ in range(len(r) * n)])
                 for e, r in zip(mine, split_even(len(prompts), len(mine))) if len(r)]
        futures = [in_background(c.generate, rows, per_row, self.record_routing) for c, rows, per_row in parts]
        outputs = [f.result() for f in futures]
        results = [parse_outputs(o, c.url) for o, (c, _, _) in zip(outputs, parts)]
        routing = []
        if self.record_routing:
            for o, (c, rows, _) in zip(outputs, parts):
                routing += routed_experts(o, rows, c.url, self.routing_num_layers, self.routing_layers,
                                          self.routing_topk)
        return (*(sum((r[k] for r in results), []) for k in range(3)), routing)

    # -- memory ----------------------------------------------------------------------------

    def release_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        """Engines give up `tags` once idle (every data-parallel leader has finished generating)."""
        tags = [t for t in tags if t in self.resident]
        if not self.memory_saver or not tags:
            return
        if self._pending is not None:  # SGLang kills its scheduler on a release while requests run
            raise RuntimeError("release_memory with a generation in flight: collect() it first")
        dist.barrier()
        with collectively():
            for client in self._owned:
                client.flush_cache()  # answers only when idle; releasing a busy server kills its scheduler
                client.release_memory(tags)
        self.resident = [t for t in self.resident if t not in tags]
        self.weights_lost |= "weights" in tags and not self.weights_backup

    def resume_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        tags = [t for t in tags if t not in self.resident]
        if not self.memory_saver or not tags:
            return
        with collectively():
            for client in self._owned:
                client.resume_memory(tags)
        self.resident += tags

    # -- weights ---------------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Every HF-named tensor of the model (the same on every rank), in buckets, inside one
        weight-update session per engine; the prefix cache is flushed once at the end."""
        if self._pending is not None:  # the update would wait for the requests, or land amid them
            raise RuntimeError("sync_weights with a generation in flight: collect() it first")
        start = time.perf_counter()
        self.version += 1
        version = str(self.version)
        with collectively():
            for client in self._owned:
                client.begin_weight_update()
        sent, count = 0, 0
        for bucket in buckets(named_tensors, self.bucket_bytes):
            self.transport.send(bucket, version)
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
            count += 1
        self.transport.finish()
        with collectively():
            for client in self._owned:
                client.end_weight_update()
                client.flush_cache()
        self.weights_lost = False
        seconds = time.perf_counter() - start
        self.last_sync = {"sync/gb": sent / 1e9, "sync/seconds": seconds, "sync/buckets": float(count),
                          "sync/gb_per_s": sent / 1e9 / max(seconds, 1e-9)}

    def state_dict(self) -> dict:
        """Weight version and position in the sampling-seed stream, for exact resumes."""
        return {"version": self.version, "calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self.version = int(state.get("version", 0))
        self._calls = int(state.get("calls", 0))

    def shutdown(self) -> None:
        """Close the transport and stop the servers this rank launched."""
        self.transport.close()
        for proc in self.processes:
            proc.stop()
