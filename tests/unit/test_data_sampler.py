"""The prompt sampler: deterministic shuffles, data-parallel shares, resumption, extra draws."""

import pytest

from r1mega.data.prompts import PromptRecord
from r1mega.data.sampler import PromptSampler


def records(n):
    return [PromptRecord(f"p{i}", f"q{i}", None, str(i), "t", {}) for i in range(n)]


def ids(batch):
    return [r.prompt_id for r in batch]


def global_steps(n, per_step, dp_size, steps, seed=0):
    """Each step's prompts over all ranks, in rank order."""
    samplers = [PromptSampler(records(n), per_step, seed, rank, dp_size) for rank in range(dp_size)]
    return [sum((ids(s.next_batch()) for s in samplers), []) for _ in range(steps)]


def test_deterministic_in_the_seed():
    a = [ids(PromptSampler(records(50), 8, seed=3).next_batch()) for _ in range(2)]
    assert a[0] == a[1]
    assert a[0] != ids(PromptSampler(records(50), 8, seed=4).next_batch())
    assert a[0] != [f"p{i}" for i in range(8)]  # shuffled


@pytest.mark.parametrize("n,per_step,dp_size", [(32, 8, 4), (30, 8, 2), (10, 4, 4), (7, 6, 3)])
def test_ranks_cover_each_prompt_once_per_epoch(n, per_step, dp_size):
    stream = sum(global_steps(n, per_step, dp_size, steps=3 * n // per_step + 1), [])
    for epoch in range(3):  # steps straddle epoch boundaries when n is not a multiple
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == sorted(ids(records(n)))
    first = PromptSampler(records(n), per_step, 0, 1, dp_size)
    assert len(first.next_batch()) == per_step // dp_size


def test_epochs_are_shuffled_differently():
    stream = sum(global_steps(20, 4, 1, steps=10), [])
    assert stream[:20] != stream[20:]


def test_resume_equals_uninterrupted():
    def run(sampler, plan):
        return [ids(sampler.next_batch() if k is None else sampler.more(k)) for k in plan]

    plan = [None, None, 3, None, 1, None, None, 5, None, None, None]
    for rank in range(2):
        whole = run(PromptSampler(records(23), 6, 9, rank, 2), plan)
        first = PromptSampler(records(23), 6, 9, rank, 2)
        head = run(first, plan[:5])
        state = first.state_dict()
        resumed = PromptSampler(records(23), 6, 9, rank, 2)
        resumed.load_state_dict(state)
        assert head + run(resumed, plan[5:]) == whole


def test_more_continues_the_stream():
    a, b = PromptSampler(records(40), 4, 1), PromptSampler(records(40), 4, 1)
    extra = a.more(3)
    assert len(extra) == 3 and ids(extra + a.next_batch()) == ids(b.next_batch() + b.more(3))
    assert a.more(0) == []
    # with several ranks, each extra draw is split over them like a step is
    ranks = [PromptSampler(records(40), 4, 1, rank, 2) for rank in range(2)]
    drawn = [ids(s.more(3)) for s in ranks]
    assert [len(d) for d in drawn] == [3, 3]
    assert drawn[0] + drawn[1] == ids(PromptSampler(records(40), 4, 1).more(6))


def test_errors():
    with pytest.raises(ValueError, match="prompts_per_step=6 must be a multiple of the data-parallel size 4"):
        PromptSampler(records(10), 6, 0, 0, 4)
    with pytest.raises(ValueError, match="no prompts"):
        PromptSampler([], 4, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler(records(10), 4, 0, dp_rank=2, dp_size=2)
    state = PromptSampler(records(10), 2, 0).state_dict()
    with pytest.raises(ValueError, match="made over 10 prompts with seed 0, this run has 11 with seed 0"):
        PromptSampler(records(11), 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 1"):
        PromptSampler(records(10), 2, 1).load_state_dict(state)
