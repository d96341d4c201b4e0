"""The bookkeeping of asynchronous rollouts, apart from processes and queues: which requests go out
when, which finished results a step takes, and what a checkpoint keeps.

A policy version is a count of finished RL steps; step t trains the policy of version t - 1, and
the groups it takes must have started under version >= t - 1 - max_staleness:

- `to_submit` lets requests out only as far ahead as the newest announced weights allow (the
  requests of max_staleness + 1 steps past them); a worker joins every announced push before it
  starts one, so with one worker the gate alone keeps the bound;
- `take` checks every result as the step takes it, in the order results finished (several workers
  finish out of order): one whose first token is older than the bound is dropped, or, with
  stale="regenerate", its prompts go out again as a new request.

Request i samples with the synchronous engine's seed for its i-th call, so with max_staleness 0
and a step's prompts in one request an asynchronous run takes the synchronous run's steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from r1mega.data.sampler import PromptSampler
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.types import Rollouts


@dataclass
class Request:
    id: int  # in submission order; the sampling seed derives from it
    records: list  # PromptRecords with token_ids
    seed: int
    indices: List[int] = field(default_factory=list)  # the records' places in the run's prompt list


@dataclass
class Result:
    request: int
    worker: int
    rollouts: Rollouts  # with the policy version of every token
    total: List[float]
    components: Dict[str, List[float]]
    failures: int
    timeouts: int
    generate_s: float
    score_s: float
    records: list = field(default_factory=list)  # the request's, added by the trainer (workers do not send them back)
    code_tests: Dict[str, int] = field(default_factory=dict)  # reward.code: how the programs' tests ended


def first_version(result: Result) -> int:
    """The oldest policy version among a result's tokens: the one its generation started under."""
    return min(min(v) for v in result.rollouts.versions)


def staleness_metrics(step: int, versions: List[List[int]], bound: int) -> Dict[str, float]:
    """How far step `step`'s samples lag the policy it trains (version step - 1): the mean and most over
    samples (by their first token) and the mean over tokens, each lag's share of samples (0..bound), and
    the most versions one sample spans (partial rollouts)."""
    lags = [step - 1 - min(v) for v in versions]
    token_lags = [step - 1 - t for v in versions for t in v]
    out = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
           "async/token_staleness_mean": sum(token_lags) / len(token_lags),
           "async/version_span_max": float(max(max(v) - min(v) for v in versions))}
    for lag in range(bound + 1):
        out[f"async/staleness_{lag}_share"] = sum(x == lag for x in lags) / len(lags)
    return out


class RequestLedger:
    def __init__(self, records: list, prompts_per_step: int, prompts_per_request: int, data_seed: int,
                 engine_seed: int, max_staleness: int, stale: str, steps: int):
        self.records, self.per_request = records, prompts_per_request
        self.per_step = prompts_per_step // prompts_per_request  # requests per step
        self.sampler = PromptSampler(records, prompts_per_step, data_seed)  # the global stream, all ranks' shares
        self.engine_seed, self.bound, self.stale, self.steps = engine_seed, max_staleness, stale, steps
        self.pending: List[Request] = []  # out and not yet trained on, in submission order
        self.done: Dict[int, Result] = {}  # finished and not yet taken, in the order they finished
        self.taken: List[Result] = []  # the step in progress's
        self.requeue: List[Request] = []  # a resumed run's pending requests: out first
        self.next_id = 0
        self.over_bound = 0  # results over the bound in the step in progress

    def to_submit(self, announced: int, trained: int) -> List[Request]:
        """New requests to send now, given the newest announced weights' version (-1: none yet) and the
        steps trained."""
        if announced < 0:  # a worker would generate with whatever weights its model was built with
            return []
        ahead = min(announced + 1 + self.bound, self.steps) - trained
        out = []
        while len(self.pending) < ahead * self.per_step:
            request = self.requeue.pop(0) if self.requeue else self._new(self.sampler.take(self.per_request))
            self.pending.append(request)
            out.append(request)
        return out

    def finished(self, result: Result) -> None:
        """A result in; one of a request not out (sent again after its worker was lost, but in after
        all) or in already is ignored."""
        if result.request in self.done or any(r.request == result.request for r in self.taken):
            return
        if any(q.id == result.request for q in self.pending):
            self.done[result.request] = result

    def out(self, ids: List[int]) -> List[Request]:
        """The requests of these ids still out and not finished (a lost worker's, to send again)."""
        return [q for q in self.pending if q.id in ids and q.id not in self.done
                and all(r.request != q.id for r in self.taken)]

    def take(self, step: int) -> tuple[Optional[List[Result]], List[Request]]:
        """Step `step`'s results, in request order, once enough within the bound have finished (else
        None), and the requests to send again (stale results under stale="regenerate")."""
        again = []
        for rid in list(self.done):
            if len(self.taken) == self.per_step:
                break
            result = self.done.pop(rid)
            if step - 1 - first_version(result) <= self.bound:
                self.taken.append(result)
                continue
            self.over_bound += 1
            request = next(q for q in self.pending if q.id == rid)
            self.pending.remove(request)
            if self.stale == "regenerate":
                again.append(self._new(request.indices))
                self.pending.append(again[-1])
        if len(self.taken) < self.per_step:
            return None, again
        chosen = sorted(self.taken, key=lambda r: r.request)
        for r in chosen:  # the records travel with the result to every rank
            r.records = next(q.records for q in self.pending if q.id == r.request)
        return chosen, again

    def commit(self) -> None:
        """The taken results are trained on."""
        ids = {r.request for r in self.taken}
        self.pending = [r for r in self.pending if r.id not in ids]
        self.taken, self.over_bound = [], 0

    def _new(self, indices: List[int]) -> Request:
        request = Request(self.next_id, [self.records[i] for i in indices],
                          NativeEngine.stream_seed(self.engine_seed, self.next_id), list(indices))
        self.next_id += 1
        return request

    def state_dict(self) -> dict:
        """The prompt stream's position and every request out and not yet trained on (generated tokens
        are not kept: a resumed run sends those requests again, first, under the restored weights)."""
        return {"sampler": self.sampler.state_dict(), "next_id": self.next_id,
                "pending": [(r.id, list(r.indices), r.seed) for r in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.next_id = int(state["next_id"])
        self.requeue = [Request(int(rid), [self.records[i] for i in indices], int(seed), list(indices))
                        for rid, indices, seed in state["pending"]]
        self.pending, self.done, self.taken = [], {}, []
