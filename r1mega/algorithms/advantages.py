"""Group-relative advantages (GRPO, Dr. GRPO, RLOO, batch-std) from per-response rewards."""

from __future__ import annotations

from typing import get_args

import torch

from r1mega.config.choices import AdvantageMode, StdConvention


def _float(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards as a floating tensor (integer scores become float32)."""
    return rewards if rewards.is_floating_point() else rewards.float()


def group_moments(rewards: torch.Tensor, group_index: torch.Tensor,
                  num_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count, mean, sum of squared deviations), each [num_groups]."""
    r = _float(rewards)
    if num_groups is None:
        num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    count = r.new_zeros(num_groups).index_add_(0, group_index, torch.ones_like(r))
    mean = r.new_zeros(num_groups).index_add_(0, group_index, r) / count.clamp(min=1)
    # Two passes (mean, then squared deviations) avoid the cancellation of E[r^2] - E[r]^2.
    sq_dev = r.new_zeros(num_groups).index_add_(0, group_index, (r - mean[group_index]) ** 2)
    return count, mean, sq_dev


def _std(sq_dev: torch.Tensor, count: torch.Tensor, std: StdConvention) -> torch.Tensor:
    """Standard deviation from moments; 0 where it is undefined (n - ddof <= 0)."""
    if std not in get_args(StdConvention):
        raise ValueError(f"std must be one of {get_args(StdConvention)}, got {std!r}")
    dof = count - 1 if std == "sample" else count
    return torch.where(dof > 0, sq_dev / dof.clamp(min=1), torch.zeros_like(sq_dev)).sqrt()


def _scale(dev: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """dev / (std + eps); 0 where that divisor is 0 (eps = 0 and no spread: dev is 0 there too)."""
    denom = std + eps
    return torch.where(denom > 0, dev / torch.where(denom > 0, denom, 1.0), torch.zeros_like(dev))


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, mode: AdvantageMode = "grpo",
                     std: StdConvention = "sample", eps: float = 1e-6) -> torch.Tensor:
    """Advantage [B] of each response relative to the other responses to its prompt.

    Groups may differ in size. A group of one response has advantage 0 in every mode: it
    has no baseline to compare with (its deviation from its own mean is 0).
    """
    r = _float(rewards)
    count, mean, sq_dev = group_moments(r, group_index)
    dev = r - mean[group_index]
    if mode == "grpo":
        return _scale(dev, _std(sq_dev, count, std)[group_index], eps)
    if mode == "drgrpo":
        return dev
    if mode == "rloo":
        # r_i - mean of the others = n/(n-1) * (r_i - group mean).
        n = count[group_index]
        return torch.where(n > 1, dev * n / (n - 1).clamp(min=1), torch.zeros_like(dev))
    if mode == "batch_std":
        batch_count = r.new_tensor([r.numel()])
        batch_std = _std(((r - r.mean()) ** 2).sum().reshape(1), batch_count, std)
        return _scale(dev, batch_std.expand_as(dev), eps)
    raise ValueError(f"unknown advantage mode {mode!r}")


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response advantage [B] copied onto its response tokens [B, T]; 0 off the mask."""
    return torch.where(mask.bool(), adv.unsqueeze(-1).to(torch.result_type(adv, 1.0)), 0.0)
