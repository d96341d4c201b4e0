"""Wall time per named phase of a step, and GPU memory at each phase's end."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict

import torch


class PhaseTimer:
    """Accumulates seconds per phase name; a phase may run several times in one step."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)
        self.memory: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self._memory(name)
            self.seconds[name] += time.perf_counter() - start

    def _memory(self, name: str) -> None:
        # the trainer's own tensors, and the whole device: a colocated engine's share is the difference
        free, total = torch.cuda.mem_get_info()
        self.memory[f"memory/{name}_trainer_gib"] = torch.cuda.memory_allocated() / 2**30
        self.memory[f"memory/{name}_device_gib"] = (total - free) / 2**30

    def metrics(self) -> Dict[str, float]:
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, **self.memory}
