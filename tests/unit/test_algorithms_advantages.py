"""Group advantages and DAPO dynamic-sampling filters against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.algorithms.advantages import broadcast_to_tokens, group_advantages
from r1mega.algorithms.filtering import varied_groups

# Interleaved groups: g0 = [1, 0, 0, 1] (n=4), g1 = [2, 5, 8] (n=3), g2 = [7] (alone), g3 = [3, 3] (tie).
GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 0, 3])
REWARDS = torch.tensor([1.0, 2.0, 0.0, 7.0, 5.0, 0.0, 3.0, 8.0, 1.0, 3.0], dtype=torch.float64)


def _by_group(g0: tuple[float, float], g1: tuple[float, float, float]) -> torch.Tensor:
    """Expected [B] from g0's values for rewards (1, 0), g1's for (2, 5, 8); g2 and g3 get 0."""
    hi, lo = g0
    return torch.tensor([hi, g1[0], lo, 0.0, g1[1], lo, 0.0, g1[2], hi, 0.0], dtype=torch.float64)


S0, S1, P1 = 1 / math.sqrt(3), 3.0, math.sqrt(6)  # g0 sample std, g1 sample / population std
CASES = {
    ("grpo", "sample"): _by_group((0.5 / S0, -0.5 / S0), (-3 / S1, 0.0, 3 / S1)),
    ("grpo", "population"): _by_group((1.0, -1.0), (-3 / P1, 0.0, 3 / P1)),
    ("drgrpo", "sample"): _by_group((0.5, -0.5), (-3.0, 0.0, 3.0)),
    ("rloo", "sample"): _by_group((1 - 1 / 3, 0 - 2 / 3), (2 - 6.5, 5 - 5.0, 8 - 3.5)),
    # whole batch: mean 3, squared deviations sum to 72 over 10 rewards
    ("batch_std", "sample"): _by_group((0.5 / math.sqrt(8), -0.5 / math.sqrt(8)),
                                       (-3 / math.sqrt(8), 0.0, 3 / math.sqrt(8))),
    ("batch_std", "population"): _by_group((0.5 / math.sqrt(7.2), -0.5 / math.sqrt(7.2)),
                                           (-3 / math.sqrt(7.2), 0.0, 3 / math.sqrt(7.2))),
}


@pytest.mark.parametrize("mode,std", list(CASES))
def test_group_advantages_hand_values(mode, std):
    adv = group_advantages(REWARDS, GROUPS, mode=mode, std=std, eps=0.0)
    torch.testing.assert_close(adv, CASES[(mode, std)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo", "batch_std"])
def test_degenerate_groups_get_zero_without_nan(mode):
    # a lone response and a tied group have no signal, even with eps = 0
    adv = group_advantages(torch.tensor([4.0, 1.0, 1.0, 1.0]), torch.tensor([0, 1, 1, 1]), mode=mode, eps=0.0)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(4))


def test_eps_and_dtype():
    adv = group_advantages(torch.tensor([0, 1]), torch.tensor([0, 0]), eps=1e-6)  # integer scores
    assert adv.dtype == torch.float32
    std = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (std + 1e-6))


def test_rloo_equals_leave_one_out_loop():
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (40,), generator=gen)
    rewards = torch.randn(40, generator=gen, dtype=torch.float64)
    adv = group_advantages(rewards, groups, mode="rloo")
    for i in range(40):
        others = (groups == groups[i]) & (torch.arange(40) != i)
        expected = rewards[i] - rewards[others].mean() if others.any() else torch.tensor(0.0).double()
        torch.testing.assert_close(adv[i], expected)


def test_unknown_mode_and_std_raise():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, GROUPS, mode="ppo")
    with pytest.raises(ValueError):
        group_advantages(REWARDS, GROUPS, std="biased")


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_dynamic_sampling_filters():
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, 2.0, 2.0 + 1e-9], dtype=torch.float64)
    assert varied_groups(rewards, groups).tolist() == [False, True, False, False]
    # an index with no members (group 1 here) is not varied
    assert varied_groups(torch.tensor([0.0, 1.0]), torch.tensor([0, 2])).tolist() == [False, False, False]
    assert varied_groups(torch.tensor([0.0, 1.0]), torch.tensor([2, 2])).tolist() == [False, False, True]
