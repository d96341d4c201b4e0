"""What r1mega's CUDA extension is built from, shared by the ahead-of-time build (setup.py) and
the just-in-time one (r1mega.ops.kernels). Imports nothing but the standard library, so
setup.py can read it before r1mega is installed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"
NVCC_FLAGS = ["-O3"]  # torch adds its own -std and arch flags
CXX_FLAGS = ["-O3"]


def ahead_of_time() -> bool:
    """Whether the install can build the kernels now (setup.py, scripts/setup.sh): CUDA torch, a
    CUDA toolkit, and a GPU or TORCH_CUDA_ARCH_LIST to take the archs from; not with
    R1MEGA_KERNELS=off."""
    if os.environ.get("R1MEGA_KERNELS", "on") == "off":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:  # pip's isolated build environment has no torch
        return False
    # with no GPU visible, torch picks no archs by itself: it needs the list
    return (torch.version.cuda is not None and CUDA_HOME is not None
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))


def sources() -> List[Path]:
    """The files compiled: the CUDA sources and the torch bindings, in build order."""
    return sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp"]


def headers() -> List[Path]:
    return sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h")])


def present() -> bool:
    """Whether the sources are on disk (an editable install or a checkout; not a wheel)."""
    return all(p.is_file() for p in sources())


def digest() -> str:
    """A hash of every source, header and flag: an ahead-of-time build carries the one it was
    built from, so a build older than the sources is noticed."""
    h = hashlib.sha256(" ".join(NVCC_FLAGS + CXX_FLAGS).encode())
    for path in sorted(sources() + headers()):
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]
