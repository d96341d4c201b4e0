"""DAPO dynamic sampling: keep only prompt groups whose responses got different rewards."""

from __future__ import annotations

import torch

# Rewards are small sums of verifier scores; closer than this counts as a tie.
REWARD_TOLERANCE = 1e-8


def varied_groups(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int | None = None,
                  tol: float = REWARD_TOLERANCE) -> torch.Tensor:
    """bool [num_groups]: True where a group's rewards are not all equal (max - min > tol)."""
    r = rewards.double()
    if num_groups is None:
        num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    # include_self=False: empty groups keep the zero fill, so they read as not varied.
    hi = r.new_zeros(num_groups).scatter_reduce(0, group_index, r, "amax", include_self=False)
    lo = r.new_zeros(num_groups).scatter_reduce(0, group_index, r, "amin", include_self=False)
    return (hi - lo) > tol

