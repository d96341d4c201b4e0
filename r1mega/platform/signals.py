"""Graceful stop: SIGTERM, and SIGUSR1 (Slurm's warning before a time limit), ask for a checkpoint.

The handler only sets a flag; the loop checks it between steps, and all ranks agree before
acting, so every rank saves the same step and exits together.
"""

from __future__ import annotations

import signal
import threading
from typing import Dict

import torch
import torch.distributed as dist

from r1mega.platform.distributed import current_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Install on entry, restore the previous handlers on exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective call)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=current_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
