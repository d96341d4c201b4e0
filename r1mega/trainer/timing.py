"""Wall time per named phase of a step."""

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
            self.seconds[name] += time.perf_counter() - start

    def metrics(self) -> Dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}
