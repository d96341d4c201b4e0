"""r1mega's CUDA kernels (kernels/csrc): the extension built at install time (setup.py), or else
compiled just in time on first use.

Only on a machine with CUDA torch, a GPU and (for the just-in-time build) a CUDA toolkit;
anywhere else `load()` is None and each op runs its PyTorch reference. Set R1MEGA_KERNELS=off
to force the references. Each op checks its kernel against its reference before trusting it
(`verify_once`); one that disagrees runs the reference instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from typing import Optional

import torch

from r1mega.ops import kernel_sources
from r1mega.platform.distributed import current_device

log = logging.getLogger(__name__)


def prebuilt() -> Optional[object]:
    """The extension built at install time, if there is one and it was built from the sources on
    disk (an install without sources, from a wheel, has nothing to compare and takes it)."""
    try:
        module = importlib.import_module("r1mega._kernels")
    except ImportError:
        return None
    if kernel_sources.present():
        built, current = getattr(module, "sources_digest", ""), kernel_sources.digest()
        if built != current:
            log.warning("r1mega._kernels was built from other sources (%s, now %s): building just in time",
                        built or "unknown", current)
            return None
    return module


def _launches(module) -> bool:
    """Whether the extension's kernels run on this GPU (a build for other GPU archs does not)."""
    try:
        rewards = torch.zeros(2, device="cuda")
        module.group_advantage(rewards, torch.tensor([0, 2], device="cuda"), 0, True, 1e-6)
        torch.cuda.synchronize()
        return True
    except RuntimeError as err:
        log.warning("r1mega._kernels does not run on this GPU (%s): building just in time", err)
        return False


@lru_cache(maxsize=1)
def load() -> Optional[object]:
    """The kernels module, or None where it cannot be had (no GPU, no build and no toolkit)."""
    if os.environ.get("R1MEGA_KERNELS", "on") == "off" or not torch.cuda.is_available():
        return None
    module = prebuilt()
    if module is not None and _launches(module):
        return module
    from torch.utils.cpp_extension import CUDA_HOME, load as build

    sources = kernel_sources.sources()
    if CUDA_HOME is None or not all(s.is_file() for s in sources):
        log.warning("r1mega kernels unavailable (CUDA toolkit: %s, sources in %s): PyTorch references run",
                    CUDA_HOME, kernel_sources.CSRC)
        return None
    try:
        return build(name="r1mega_kernels", sources=[str(s) for s in sources],
                     extra_cflags=kernel_sources.CXX_FLAGS, extra_cuda_cflags=kernel_sources.NVCC_FLAGS,
                     verbose=False)
    except Exception as err:  # no ninja, a toolkit torch was not built with, an unsupported compiler
        log.warning("r1mega kernels failed to build (%s): PyTorch references run", err)
        return None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (all on CUDA, kernels built)."""
    return all(t.is_cuda for t in tensors) and load() is not None


_VERIFIED: set = set()
_FAILED: set = set()


def verified(op: str) -> bool:
    return op in _VERIFIED


def failed(op: str) -> bool:
    """Whether `op`'s kernel disagreed with its reference in this process (it then runs the reference)."""
    return op in _FAILED


def verify_once(op: str, out: torch.Tensor, reference, tol: float = 1e-5, atol: Optional[float] = None) -> bool:
    """On an op's first kernel call in this process (per op and dtype: name it so), compare with its
    PyTorch reference on the same inputs: the same NaN and inf positions and values, and elsewhere
    a relative error (norm of the difference over the reference's) under tol, or with atol every
    element within atol + tol * |reference| (for outputs whose scale varies widely).

    Returns whether the kernel's result may be used. A mismatch is logged once as an error and
    the op runs its reference from then on in this process: callers whose kernel and reference
    issue different collectives must agree on the path across their group (`agree`)."""
    if op in _FAILED:
        return False
    if op in _VERIFIED or out.numel() == 0:
        return True
    ref = reference().to(out.device, torch.float64)
    got = out.to(torch.float64)
    finite = torch.isfinite(ref)
    same_special = torch.equal(finite, torch.isfinite(got)) and torch.equal(
        torch.isnan(ref), torch.isnan(got)) and torch.equal(ref[torch.isinf(ref)], got[torch.isinf(ref)])
    if not finite.any():
        err = 0.0
    elif atol is None:
        err = float((got[finite] - ref[finite]).norm() / ref[finite].norm().clamp(min=1e-12))
    else:  # the worst element's error in units of its allowance (fails above 1, like err > tol)
        err = tol * float(((got[finite] - ref[finite]).abs() / (atol + tol * ref[finite].abs())).max())
    if not same_special or err > tol:
        log.error("r1mega kernel %s disagrees with its reference (relative error %.2e, NaN/inf %s): the PyTorch "
                  "reference runs instead", op, err, "match" if same_special else "differ")
        _FAILED.add(op)
        return False
    _VERIFIED.add(op)
    return True


def agree(ok: bool, group) -> bool:
    """Collective over `group`: True on every rank when every rank passes True. A path whose
    kernel issues other collectives than its reference must be taken by the whole group or by
    none of it; ranks that disagree (one without the build, one whose check failed) would wait
    in collectives that never match."""
    if group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=current_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())
