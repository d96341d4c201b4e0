"""A rank started by the local launcher can use the GPU.

The launcher forks ranks from a forkserver; if that server has asked torch for the device
count (any import that calls `torch.cuda.is_available()` does), torch refuses CUDA in every
fork of it. This runs the imports a rank runs, then a kernel."""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.gpu


def _uses_cuda() -> float:
    import r1mega.platform.distributed  # noqa: F401  (what a rank imports first)

    torch.cuda.set_device(0)
    return (torch.arange(4.0, device="cuda") * 2).sum().item()


def test_spawned_rank_uses_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert spawn(1, _uses_cuda, timeout=300.0) == [12.0]
