"""The group-advantage CUDA kernel against the PyTorch definition (float64),
on fresh random inputs: groups of one, groups wider than a thread block, no spread, eps 0."""

from __future__ import annotations

import pytest
import torch

from r1mega.algorithms.advantages import group_advantages
from r1mega.ops.kernels import load

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels():
    mod = load()
    if mod is None:
        pytest.skip("r1mega kernels could not be built here (no CUDA toolkit?)")
    return mod


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode,code", [("grpo", 0), ("drgrpo", 1), ("rloo", 2)])
@pytest.mark.parametrize("std", ["sample", "population"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_group_advantage_kernel(kernels, seed, mode, code, std, eps):
    g = torch.Generator().manual_seed(seed * 100 + code)
    sizes = torch.randint(1, 40, (50,), generator=g).tolist() + [1, 1, 700, 2]
    rewards = torch.randn(sum(sizes), generator=g).float()
    rewards[:sizes[0]] = 0.5  # no spread: advantage 0 whatever eps is
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(sizes).cumsum(0)])
    ref = group_advantages(rewards.double(), index, mode, std, eps)
    got = kernels.group_advantage(rewards.cuda(), offsets.cuda(), code, std == "sample", eps).cpu()
    assert torch.isfinite(got).all()
    assert ((got.double() - ref).norm() / ref.norm().clamp(min=1e-12)) < 1e-6
    assert torch.all(got[:sizes[0]] == 0)


def test_dispatch_takes_the_kernel_on_cuda(kernels):
    from r1mega.trainer.rl.step import advantages_by_offsets as group_advantage

    rewards = torch.randn(12, device="cuda")
    offsets = torch.tensor([0, 4, 8, 12], device="cuda")
    index = torch.arange(3).repeat_interleave(4)
    ref = group_advantages(rewards.double().cpu(), index)
    assert (group_advantage(rewards, offsets).cpu().double() - ref).abs().max() < 1e-6
