"""torch behaviour that differs between the tested releases (README: Tested matrix), pinned down once.

Pure tensor code: imports torch only, so r1mega.algorithms can use it.
"""

from __future__ import annotations

import torch


def clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """x clamped to [low, high]; its gradient is 1 on the closed interval, bounds included, and 0 outside.

    torch.clamp passes the gradient at its bounds up to torch 2.13 and stops it there from 2.14 on
    (x = 20.0 clamped to +-20: gradient 1 on 2.13.0, 0 on 2.14.1). r1mega's clamps follow the
    CUDA loss kernel (kernels/csrc/grpo_loss_math.cuh), which passes it, on every torch.
    """
    return torch.where((x >= low) & (x <= high), x, x.detach().clamp(low, high))
