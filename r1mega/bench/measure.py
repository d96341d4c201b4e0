"""What every suite measures the same way: medians, peak memory, the machine."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import megatron.core
import torch
import torch.distributed as dist

from r1mega.trainer.timing import PhaseTimer

T = TypeVar("T")


def timed(fn: Callable[[int], T], warmup: int, repeats: int) -> List[Tuple[float, T]]:
    """Call fn(1), fn(2), ... warmup + repeats times; (wall seconds, result) of the timed calls.
    Peak memory counts from the first timed call."""
    timer, out = PhaseTimer(), []
    for i in range(1, warmup + repeats + 1):
        if i == warmup + 1:
            reset_peak_memory()
        with timer("call"):
            result = fn(i)
        seconds = timer.seconds.pop("call")
        if i > warmup:
            out.append((seconds, result))
    return out


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> Dict[str, float]:
    """GPU: peak allocated by torch since the last reset. CPU: the process's peak resident set
    (it includes the interpreter and libraries and never resets)."""
    if torch.cuda.is_available():
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def max_over_ranks(values: Dict[str, float]) -> Dict[str, float]:
    """Each value's maximum over all ranks (the same keys on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def environment() -> Dict[str, Optional[str]]:
    """Where and on what the figures were measured."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                             capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
