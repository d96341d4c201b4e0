"""Write-then-rename for checkpoint folders written by every rank, and small rank helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def staging_dir(final: Path) -> Path:
    """A fresh `<final>.tmp` folder, made by rank 0 and visible to every rank on return."""
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Make a completely written folder visible under its final name (replacing an old one)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def error_line(exc: BaseException) -> str:
    """The cause in one line; torch's CheckpointException carries each rank's traceback, cause last."""
    from torch.distributed.checkpoint.api import CheckpointException

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if isinstance(exc, CheckpointException):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"

