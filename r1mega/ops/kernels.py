"""r1mega's CUDA kernels (kernels/csrc): the built extension, compiled just in time on first use.

Only on a machine with CUDA torch, a GPU and a CUDA toolkit; anywhere else `load()` is None and
each op runs its PyTorch reference. Set R1MEGA_KERNELS=off to force the references.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parents[2] / "kernels" / "csrc"


@lru_cache(maxsize=1)
def load() -> Optional[object]:
    """The kernels module, or None where it cannot be built (no GPU, no toolkit, no sources)."""
    if os.environ.get("R1MEGA_KERNELS", "on") == "off" or not torch.cuda.is_available():
        return None
    from torch.utils.cpp_extension import CUDA_HOME, load as build

    sources = sorted(SOURCES.glob("*.cu")) + [SOURCES / "bindings.cpp"]
    if CUDA_HOME is None or not all(s.is_file() for s in sources):
        log.warning("r1mega kernels unavailable (CUDA toolkit: %s, sources in %s): PyTorch references run",
                    CUDA_HOME, SOURCES)
        return None
    return build(name="r1mega_kernels", sources=[str(s) for s in sources], extra_cuda_cflags=["-O3"],
                 verbose=False)


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors (all on CUDA, kernels built)."""
    return all(t.is_cuda for t in tensors) and load() is not None


_VERIFIED: set = set()


def verified(op: str) -> bool:
    return op in _VERIFIED


def verify_once(op: str, out: torch.Tensor, reference, tol: float = 1e-5) -> None:
    """On an op's first kernel call in this process, compare with its PyTorch reference on the same
    inputs; a mismatch stops the run (R1MEGA_KERNELS=off runs the references instead)."""
    if op in _VERIFIED:
        return
    ref = reference().to(out.device, torch.float64)
    got = out.to(torch.float64)
    err = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
    if bool(torch.isfinite(got).all()) != bool(torch.isfinite(ref).all()) or err > tol:
        raise RuntimeError(f"r1mega kernel {op} disagrees with its reference (relative error {err:.2e}); "
                           f"set R1MEGA_KERNELS=off to run the references")
    _VERIFIED.add(op)
