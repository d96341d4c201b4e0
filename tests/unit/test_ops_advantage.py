"""The advantage dispatch point on CPU: group offsets from the rollouts' group index, and the
PyTorch path by offsets (the kernel's oracle; tests/gpu compares them)."""

from __future__ import annotations

import pytest
import torch

from r1mega.algorithms.advantages import group_advantages
from r1mega.ops.advantage import group_offsets
from r1mega.trainer.rl.step import advantages_by_offsets as group_advantage


def test_offsets_of_contiguous_groups_with_any_ids():
    assert group_offsets(torch.tensor([5, 5, 5, 2, 2, 9])).tolist() == [0, 3, 5, 6]
    assert group_offsets(torch.tensor([], dtype=torch.long)).tolist() == [0]
    with pytest.raises(ValueError, match="each group's rows together"):
        group_offsets(torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo", "batch_std"])
@pytest.mark.parametrize("std", ["sample", "population"])
def test_offsets_path_equals_index_path(mode, std):
    g = torch.Generator().manual_seed(hash((mode, std)) % 1000)
    sizes = [1, 4, 7, 2, 300]
    rewards = torch.randn(sum(sizes), dtype=torch.float64, generator=g)
    rewards[5:12] = 0.25  # a group with no spread
    index = torch.repeat_interleave(torch.arange(len(sizes)) * 3 + 1, torch.tensor(sizes))
    got = group_advantage(rewards, group_offsets(index), mode, std, 1e-6)
    assert torch.equal(got, group_advantages(rewards, index, mode, std, 1e-6))
    assert got[0] == 0 and torch.all(got[5:12] == 0)


def test_a_kernel_is_checked_against_its_reference_on_first_use(fresh_kernel_checks, caplog):
    kernels = fresh_kernel_checks
    ref = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert kernels.verify_once("good_op", ref.float(), lambda: ref.double())
    assert kernels.verify_once("good_op", ref + 1.0, lambda: ref)  # checked once per process
    with caplog.at_level("ERROR", logger="r1mega.ops.kernels"):
        assert not kernels.verify_once("test_op", ref + 1e-3, lambda: ref)
    assert "kernel test_op disagrees with its reference" in caplog.text and "reference runs instead" in caplog.text
    assert kernels.failed("test_op") and not kernels.verify_once("test_op", ref, lambda: ref)  # and stays refused
    nan = float("nan")
    caplog.clear()
    with caplog.at_level("ERROR", logger="r1mega.ops.kernels"):  # NaN in both does not hide the rest
        assert not kernels.verify_once("nan_op", torch.tensor([nan, 5.0, 7.0]), lambda: torch.tensor([nan, 1.0, 2.0]))
        assert not kernels.verify_once("inf_op", torch.tensor([nan, 1.0]), lambda: torch.tensor([0.0, 1.0]))
    assert "NaN/inf match" in caplog.text and "NaN/inf differ" in caplog.text
    assert kernels.verify_once("empty_op", torch.tensor([]), lambda: torch.tensor([]))  # nothing to check
    assert not kernels.verified("empty_op")


def test_elementwise_check_sees_small_entries_next_to_huge_ones(fresh_kernel_checks):
    kernels = fresh_kernel_checks
    ref = torch.tensor([4.8e8, 1e-3, 0.5, -2.0])
    got = ref.clone()
    got[1] = 2e-3  # invisible in the norm of the whole vector
    assert kernels.verify_once("wide_op", got, lambda: ref)
    assert not kernels.verify_once("wide_elementwise_op", got, lambda: ref, 1e-5, atol=1e-6)
    assert kernels.verify_once("rounded_op", ref * (1 + 1e-7), lambda: ref, 1e-5, atol=1e-6)  # rounding passes
