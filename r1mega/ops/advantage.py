"""The group-advantage kernel (kernels/csrc/group_advantage.cu) over contiguous groups of variable size.

The RL step's advantage phase asks it first and runs the PyTorch definition
(r1mega.algorithms.advantages) where it cannot run: CPU tensors, batch_std mode (one reduction
over the whole batch, not per group), kernels not built, or a kernel that disagreed with that
definition on its first use.
"""

from __future__ import annotations

from typing import Callable, Optional, get_args

import torch

from r1mega.config.choices import StdConvention
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


def kernel_group_advantages(rewards: torch.Tensor, offsets: torch.Tensor, mode: str, std: str, eps: float,
                            pytorch_path: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernel's advantage [B] of each row (groups are rows [offsets[g], offsets[g + 1])), or None
    where it does not run; `pytorch_path()` gives the definition's, to check the kernel's first result."""
    if mode not in KERNEL_MODES or std not in get_args(StdConvention) or not available(rewards, offsets) or failed(
            "group_advantage"):
        return None
    out = load().group_advantage(rewards.float().contiguous(), offsets.long().contiguous(), KERNEL_MODES[mode],
                                 std == "sample", float(eps))
    out = out.to(rewards.dtype) if rewards.is_floating_point() else out
    return out if verify_once("group_advantage", out, pytorch_path) else None
