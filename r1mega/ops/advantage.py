"""Group advantages over contiguous groups of variable size, and their broadcast onto packed tokens.

The dispatch point of the RL step: the CUDA kernel (kernels/csrc/group_advantage.cu) for CUDA
inputs when built, else r1mega.algorithms.advantages, the reference. batch_std mode has no
kernel (it needs one reduction over the whole batch, not per group) and always takes the reference.
"""

from __future__ import annotations

import torch

from r1mega.algorithms.advantages import group_advantages
from r1mega.ops.kernels import available, failed, load, verify_once

KERNEL_MODES = {"grpo": 0, "drgrpo": 1, "rloo": 2}


def group_offsets(group_index: torch.Tensor) -> torch.Tensor:
    """Offsets [G + 1] of the groups of `group_index`, whose rows must be contiguous (any ids)."""
    n = group_index.numel()
    change = torch.ones(n, dtype=torch.bool, device=group_index.device)
    change[1:] = group_index[1:] != group_index[:-1]
    starts = change.nonzero().flatten()
    if len(torch.unique(group_index)) != len(starts):
        raise ValueError("group_index must list each group's rows together")
    return torch.cat([starts, starts.new_full((1,), n)])


def group_advantage(rewards: torch.Tensor, offsets: torch.Tensor, mode: str = "grpo", std: str = "sample",
               eps: float = 1e-6) -> torch.Tensor:
    """Advantage [B] of each row; groups are rows [offsets[g], offsets[g + 1])."""
    if mode in KERNEL_MODES and std in ("sample", "population") and available(rewards, offsets) and not failed(
            "group_advantage"):
        out = load().group_advantage(rewards.float().contiguous(), offsets.long().contiguous(), KERNEL_MODES[mode],
                                     std == "sample", float(eps))
        out = out.to(rewards.dtype) if rewards.is_floating_point() else out
        if verify_once("group_advantage", out, lambda: _reference(rewards.double(), offsets, mode, std, eps)):
            return out
    return _reference(rewards, offsets, mode, std, eps)


def _reference(rewards, offsets, mode, std, eps):
    counts = offsets[1:] - offsets[:-1]
    index = torch.repeat_interleave(torch.arange(len(counts), device=rewards.device), counts)
    return group_advantages(rewards, index, mode, std, eps)


def advantage_to_tokens(adv: torch.Tensor, token_offsets: torch.Tensor) -> torch.Tensor:
    """Packed per-token advantages: row s's value on tokens [token_offsets[s], token_offsets[s + 1]),
    token_offsets[0] = 0."""
    total = int(token_offsets[-1]) if token_offsets.numel() else 0
    if available(adv, token_offsets) and not failed("broadcast_to_tokens"):
        out = load().broadcast_to_tokens(adv.float().contiguous(), token_offsets.long().contiguous(), total)
        if verify_once("broadcast_to_tokens", out, lambda: _tokens_reference(adv.float(), token_offsets, total)):
            return out
    return _tokens_reference(adv, token_offsets, total)


def _tokens_reference(adv, token_offsets, total):
    return torch.repeat_interleave(adv, token_offsets[1:] - token_offsets[:-1], output_size=total)
