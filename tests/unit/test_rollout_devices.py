"""Where async rollout workers run beside the trainer's ranks, and how weights reach them."""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.distributed import rollout_worker_devices


def _gpus(monkeypatch, count, visible=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


@pytest.mark.parametrize("count, visible, local, workers, want", [
    (0, None, 2, 2, ([None, None], "gloo")),
    (8, None, 4, 2, (["4", "5"], "nccl")),  # GPUs of their own after the trainer's: NCCL
    (4, "3,5,6,7", 2, 2, (["6", "7"], "nccl")),  # named as the parent sees them
    (1, None, 1, 1, (["0"], "gloo")),  # one GPU shared with the trainer: NCCL would refuse it
    (2, "1,0", 2, 3, (["1", "0", "1"], "gloo")),
])
def test_worker_devices(monkeypatch, count, visible, local, workers, want):
    _gpus(monkeypatch, count, visible)
    assert rollout_worker_devices(local, workers) == want
