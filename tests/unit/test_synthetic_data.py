"""The built-in synthetic LM task: deterministic, resumable, split over data-parallel ranks."""

import numpy as np
import pytest
import torch

from r1mega.data.synthetic import SyntheticLM


def _data(**kw):
    args = dict(vocab_size=256, seq_length=24, global_batch_size=8, micro_batch_size=2, seed=7)
    return SyntheticLM(**{**args, **kw})


def test_shapes_and_determinism():
    a, b = _data(), _data()
    for _ in range(3):
        ma, mb = a.next_micro_batches(), b.next_micro_batches()
        assert len(ma) == a.num_micro_batches == 4
        assert all(m.shape == (2, 25) and m.dtype == torch.int64 for m in ma)
        assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not torch.equal(_data().global_batch(0), _data(seed=8).global_batch(0))
    assert not torch.equal(a.global_batch(0), a.global_batch(1))


def test_sequences_follow_a_rule():
    batch = _data(global_batch_size=64).global_batch(3).numpy()
    assert batch.min() >= 0 and batch.max() < 32  # the alphabet is the first 32 ids
    for row in batch:
        counts = np.all(np.diff(row) % 32 == 1)
        repeats = any(np.array_equal(row[p:], row[:-p]) for p in range(2, 9))
        assert counts or repeats, row


def test_small_vocab_caps_the_alphabet():
    assert _data(vocab_size=5).global_batch(0).max() < 5


def test_resume_gives_the_uninterrupted_batches():
    uninterrupted = _data()
    expected = [uninterrupted.next_micro_batches() for _ in range(5)]
    first = _data()
    for _ in range(2):
        first.next_micro_batches()
    resumed = _data()
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"position": 2, "seed": 7}
    for want in expected[2:]:
        got = resumed.next_micro_batches()
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_data_parallel_ranks_split_the_global_batch():
    single = torch.cat(_data().next_micro_batches())
    ranks = [torch.cat(_data(dp_rank=r, dp_size=2).next_micro_batches()) for r in range(2)]
    assert torch.equal(torch.cat(ranks), single)
    assert _data(dp_rank=1, dp_size=2).num_micro_batches == 2


def test_bad_batch_sizes_and_seed_mismatch():
    with pytest.raises(ValueError, match="data.global_batch_size=6 .* 2 x 2"):
        _data(global_batch_size=6, dp_size=2)
    with pytest.raises(ValueError, match="data.seed"):
        _data().load_state_dict({"position": 1, "seed": 99})
