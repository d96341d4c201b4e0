"""Token-balanced partitions, and RL rows packed into THD micro-batches."""

from __future__ import annotations

import random

import pytest
import torch

from r1mega.data.balance import balanced_parts, first_fit_bins, token_bins
from r1mega.rollout.types import Rollouts
from r1mega.trainer.rl.batch import StepBatch, pack, response_values


def _sums(lengths, parts):
    return [sum(lengths[i] for i in p) for p in parts]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_balanced_parts_cover_every_index_once_and_spread_at_most_the_longest(k):
    rng = random.Random(k)
    lengths = [int(rng.lognormvariate(4, 1.2)) + 1 for _ in range(40)]  # long-tailed
    parts = balanced_parts(lengths, k)
    assert len(parts) == k and sorted(sum(parts, [])) == list(range(40))
    sums = _sums(lengths, parts)
    assert max(sums) - min(sums) <= max(lengths)
    assert balanced_parts(lengths, k) == parts  # deterministic: ranks agree without talking


def test_largest_differencing_beats_greedy_on_a_known_case():
    # greedy (largest into the emptiest) gives {8, 5, 4} / {7, 6} = 17 / 13; differencing 16 / 14
    lengths = [8, 7, 6, 5, 4]
    assert sorted(_sums(lengths, balanced_parts(lengths, 2))) == [14, 16]


def test_balanced_parts_with_fewer_items_than_parts_leaves_parts_empty():
    parts = balanced_parts([5, 1], 3)
    assert sorted(len(p) for p in parts) == [0, 1, 1]
    with pytest.raises(ValueError, match="k=0"):
        balanced_parts([1], 0)


def test_token_bins_keep_the_budget_and_balance():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(30)]
    bins = token_bins(lengths, 300)
    assert len(bins) == len(first_fit_bins(lengths, 300))
    sums = _sums(lengths, bins)
    assert max(sums) <= 300 and max(sums) - min(sums) <= max(lengths)
    assert min(_sums(lengths, first_fit_bins(lengths, 300))) < min(sums)  # first fit leaves a small last bin
    # an item over the budget goes alone; min_parts splits further when there are enough items
    assert sorted(map(sorted, token_bins([500, 10, 10], 100))) == [[0], [1, 2]]
    assert len(token_bins([500, 10, 10], 100, min_parts=3)) == 3
    assert len(token_bins([5, 5], 100, min_parts=4)) == 2
    assert token_bins([], 100) == []


def _batch():
    rollouts = Rollouts(prompt_ids=[[1, 2, 3], [4, 5], [6]], response_ids=[[7, 8], [9, 10, 11, 12], [13]],
                        logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6], [-0.7]], finish_reasons=["stop"] * 3,
                        group_index=[0, 0, 1])
    return StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -1.0, 0.5]))


def test_pack_lays_rows_back_to_back_and_reads_their_response_positions():
    m = pack(_batch(), [0, 1, 2], multiple=4)
    # inputs 1 2 3 7 | 4 5 9 10 11 | 6, then two padding positions to reach a multiple of 4
    assert m.tokens.tolist() == [[1, 2, 3, 7, 4, 5, 9, 10, 11, 6, 0, 0]]
    assert m.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 1]]
    assert m.cu_seqlens.tolist() == [0, 4, 9, 10, 12] and m.max_seqlen == 5
    # response tokens are predicted at each row's positions prompt_len - 1 ... len - 2
    assert m.logits_at.tolist() == [2, 3, 5, 6, 7, 8, 9] and m.logits_window is m.logits_at
    assert m.targets.tolist() == [[7, 8, 9, 10, 11, 12, 13]]
    assert m.tokens[0, m.logits_at].tolist() == [3, 7, 5, 9, 10, 11, 6]  # the inputs they are predicted from
    assert m.mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert m.advantages.tolist() == [1.0, -1.0, 0.5]
    assert torch.equal(m.per_row(m.targets.float()), torch.tensor([[7.0, 8, 0, 0], [9, 10, 11, 12], [13, 0, 0, 0]]))
    back = response_values(m, torch.tensor([[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]]))
    assert [v.tolist() for v in back] == [pytest.approx([-0.1, -0.2]), pytest.approx([-0.3, -0.4, -0.5, -0.6]),
                                          pytest.approx([-0.7])]
    assert torch.allclose(m.rollout_logp[1], torch.tensor([-0.3, -0.4, -0.5, -0.6]))
    assert m.model_inputs()["packed_seq_params"].cu_seqlens_q is m.cu_seqlens


def test_pack_of_an_empty_response_reads_no_position_of_its_row():
    rollouts = Rollouts(prompt_ids=[[1, 2], [3, 4, 5]], response_ids=[[], [6, 7]], logprobs=[[], [-0.1, -0.2]],
                        finish_reasons=["stop"] * 2, group_index=[0, 0])
    m = pack(StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -1.0])), [0, 1])
    assert m.tokens.tolist() == [[1, 3, 4, 5, 6]] and m.cu_seqlens.tolist() == [0, 1, 5]
    assert m.logits_at.tolist() == [3, 4] and m.targets.tolist() == [[6, 7]]
    assert m.mask.tolist() == [[False, False], [True, True]]


def test_per_row_carries_gradients_to_the_packed_positions():
    m = pack(_batch(), [2, 0])
    values = torch.arange(3.0).reshape(1, 3).requires_grad_(True)
    m.per_row(values).sum().backward()
    assert values.grad.tolist() == [[1.0, 1.0, 1.0]]
    assert m.rows == [2, 0] and m.per_row(values).tolist() == [[0.0, 0.0], [1.0, 2.0]]
