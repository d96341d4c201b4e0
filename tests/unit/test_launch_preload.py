"""The forkserver preloads megatron-core only where no CUDA device can be counted: counting
one marks the server so that its forks refuse CUDA (tests/gpu/test_launch.py shows the rank)."""

from __future__ import annotations

import torch

from r1mega.platform import launch


def test_preload_without_cuda_imports_megatron(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.preload_modules() == launch.PRELOAD
    assert "megatron.core.models.gpt" in launch.PRELOAD


def test_preload_with_cuda_is_torch_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.preload_modules() == ["torch"]
