"""Write-then-rename for checkpoint folders written by every rank."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from r1mega.platform.distributed import barrier, rank


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def expert_biases(chunk: torch.nn.Module) -> list:
    """(name, buffer) of the routers' expert bias (DeepSeek-V3's aux-loss-free balancing): state that
    routes as much as the weights do, though a buffer the optimizer never sees."""
    return [(n, b) for n, b in chunk.named_buffers() if n.endswith("router.expert_bias")]


def staging_dir(final: Path) -> Path:
    """A fresh `<final>.tmp` folder, made by rank 0 and visible to every rank on return."""
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def error_line(exc: BaseException) -> str:
    """The cause in one line; torch's CheckpointException carries each rank's traceback, cause last."""
    from torch.distributed.checkpoint.api import CheckpointException

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if isinstance(exc, CheckpointException):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"

