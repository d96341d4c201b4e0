"""The asynchronous rollouts' ledger: how far ahead requests go out, which finished results a step
takes, what happens to one over the staleness bound, and what a checkpoint keeps.

The last test simulates workers that finish out of order, many steps long, and checks the bound
on every sample a step takes."""

from __future__ import annotations

import random

import pytest
import torch

from r1mega.data.prompts import PromptRecord
from r1mega.data.sampler import PromptSampler
from r1mega.rollout.ledger import RequestLedger, Result, first_version, staleness_metrics
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.types import Rollouts

RECORDS = [PromptRecord(f"p{i}", f"prompt {i}", None, str(i), "test", token_ids=[1, i + 2]) for i in range(40)]


def ledger(bound=0, stale="drop", per_step=4, per_request=2, steps=100) -> RequestLedger:
    return RequestLedger(RECORDS, per_step, per_request, data_seed=5, engine_seed=1234000, max_staleness=bound,
                         stale=stale, steps=steps)


def result(request, versions, worker=0, rows=2) -> Result:
    """A finished request whose rows' tokens were sampled under `versions` (one list per row)."""
    return Result(request.id, worker, Rollouts([[1]] * rows, [[7] * len(v) for v in versions],
                                               [[0.0] * len(v) for v in versions], ["length"] * rows,
                                               list(range(rows)), [list(v) for v in versions]),
                  total=[0.0] * rows, components={}, failures=0, timeouts=0, generate_s=0.0, score_s=0.0)


def test_requests_go_out_only_as_far_as_announced_weights_allow():
    book = ledger(bound=1)
    assert book.to_submit(announced=-1, trained=0) == []  # no weights at the workers yet
    first = book.to_submit(announced=0, trained=0)
    assert [r.id for r in first] == [0, 1, 2, 3]  # two steps of two requests: bound + 1 steps ahead
    assert book.to_submit(announced=0, trained=0) == []
    # the prompts are the global stream's, in order, and request i samples as the engine's i-th call
    stream = PromptSampler(RECORDS, 4, 5).take(8)
    assert [i for r in first for i in r.indices] == stream
    assert [r.records for r in first] == [[RECORDS[i] for i in r.indices] for r in first]
    assert [r.seed for r in first] == [NativeEngine.stream_seed(1234000, i) for i in range(4)]
    # the last step's requests are the last ones
    assert len(ledger(bound=3, steps=2).to_submit(announced=0, trained=0)) == 4


def test_step_takes_results_in_request_order_once_enough_have_finished():
    book = ledger(bound=1)
    reqs = book.to_submit(announced=0, trained=0)
    book.finished(result(reqs[1], [[0, 0], [0]]))
    assert book.take(step=1) == (None, [])
    book.finished(result(reqs[2], [[0], [0]]))  # another step's, finished before request 0
    book.finished(result(reqs[0], [[0], [0, 0, 0]]))
    chosen, again = book.take(step=1)
    assert [r.request for r in chosen] == [1, 2] and again == []  # the first two to finish, in request order
    assert chosen[0].records == reqs[1].records
    book.commit()
    assert [r.id for r in book.pending] == [0, 3]
    assert book.take(step=2) == (None, [])  # request 0 is in, request 3 not yet
    book.finished(result(reqs[3], [[1], [1]]))
    chosen, _ = book.take(step=2)
    assert [r.request for r in chosen] == [0, 3]


@pytest.mark.parametrize("stale", ["drop", "regenerate"])
def test_results_over_the_bound_are_dropped_or_regenerated(stale):
    book = ledger(bound=0, stale=stale)
    reqs = book.to_submit(announced=0, trained=0)
    book.commit()  # nothing taken
    book.finished(result(reqs[0], [[0, 1], [1]]))  # its first token under version 0
    book.finished(result(reqs[1], [[1], [1]]))
    chosen, again = book.take(step=3)  # trains version 2: version 0 and 1 are over a bound of 0
    assert chosen is None and book.over_bound == 2
    assert [r.id for r in book.pending] == [r.id for r in again]
    if stale == "drop":
        assert again == []
        fresh = book.to_submit(announced=2, trained=2)  # new prompts go out in their place
        assert [r.indices for r in fresh] == [PromptSampler(RECORDS, 4, 5).take(8)[4:6],
                                              PromptSampler(RECORDS, 4, 5).take(8)[6:8]]
    else:
        assert [r.indices for r in again] == [reqs[0].indices, reqs[1].indices]  # the same prompts again
        assert [r.id for r in again] == [2, 3]  # as new requests: new seeds
        assert book.to_submit(announced=2, trained=2) == []


def test_checkpoint_keeps_every_request_not_trained_on():
    whole, split = ledger(bound=1), ledger(bound=1)
    trained_whole, trained_split = [], []
    for book, trained, stop_at in ((whole, trained_whole, None), (split, trained_split, 2)):
        for step in range(1, 5):
            if step == stop_at:  # a checkpoint after step 1, loaded into a new ledger
                state = book.state_dict()
                book = ledger(bound=1)
                book.load_state_dict(state)
                split = book
            for r in book.to_submit(announced=step - 1, trained=step - 1):
                book.finished(result(r, [[step - 1]] * 2))
            chosen, _ = book.take(step)
            trained += [i for r in chosen for i in r.records]
            book.commit()
    assert trained_split == trained_whole  # nothing lost, nothing twice
    assert len({r.prompt_id for r in trained_whole}) == len(trained_whole)


@pytest.mark.parametrize("bound,stale", [(0, "drop"), (1, "drop"), (2, "regenerate"), (1, "regenerate")])
def test_bound_holds_for_every_sample_with_workers_finishing_out_of_order(bound, stale):
    """Three simulated workers take requests first come first served, start each under the newest
    weights announced, and finish in random order; pushes go out after every step (or every
    bound + 1 steps). Every row of every result a step takes started within the bound."""
    rng = random.Random(bound * 10 + len(stale))
    book = ledger(bound=bound, stale=stale, per_step=4, per_request=1, steps=30)
    every = bound + 1 if stale == "regenerate" else 1
    announced, queue, running, seen = 0, [], [], 0
    for step in range(1, 31):
        while True:
            queue += book.to_submit(announced, step - 1)
            while len(running) < 3 and queue:  # a free worker starts the oldest request
                request = queue.pop(0)
                running.append((request, announced))
            if running:  # one of them finishes, at random
                request, version = running.pop(rng.randrange(len(running)))
                spans = [[version + rng.randint(0, 1)] * 3 for _ in range(2)]
                spans[0][0] = version  # the first token under the version it started with
                book.finished(result(request, spans))
            chosen, again = book.take(step)
            queue += again
            if chosen is not None:
                break
        for r in chosen:
            assert step - 1 - first_version(r) <= bound
            for versions in r.rollouts.versions:
                assert step - 1 - min(versions) <= bound
        seen += book.over_bound
        book.commit()
        if step % every == 0:
            announced = step
    if bound == 0:
        assert seen == 0  # nothing runs ahead: nothing can be stale
    if every == 1 and bound > 0:
        assert seen > 0  # the check, not only the gate, was needed


def test_staleness_metrics_count_samples_by_their_first_token():
    # step 4 trains version 3: a sample of version 3, one of 2, and one started under 1 and ending under 3
    m = staleness_metrics(4, [[3, 3], [2], [1, 2, 3]], bound=2)
    assert m["async/staleness_max"] == 2.0 and m["async/staleness_mean"] == 1.0
    assert m["async/token_staleness_mean"] == (0 + 0 + 1 + 2 + 1 + 0) / 6
    assert m["async/version_span_max"] == 2.0
    assert [m[f"async/staleness_{k}_share"] for k in range(3)] == [1 / 3, 1 / 3, 1 / 3]


def test_packed_rollouts_come_back_whole():
    """What a one-step-off checkpoint keeps of the groups generated ahead: every row, its finish reason,
    and its log-probs as training reads them (float32)."""
    r = Rollouts([[1, 2], [1, 2], [7]], [[5, 6, 9], [], [4]], [[-0.1, -2.25, -1e-8], [], [-3.0]],
                 ["stop", "length", "length"], [0, 0, 1], versions=[[0, 0, 0], [], [0]])
    back = Rollouts.unpack(r.pack())
    assert (back.prompt_ids, back.response_ids, back.finish_reasons, back.group_index) == \
        (r.prompt_ids, r.response_ids, r.finish_reasons, r.group_index)
    assert [torch.tensor(x, dtype=torch.float32).tolist() for x in r.logprobs] == back.logprobs
    assert back.versions == []
