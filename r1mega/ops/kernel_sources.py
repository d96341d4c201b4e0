"""What r1mega's CUDA extension is built from, shared by the ahead-of-time build (setup.py) and
the just-in-time one (r1mega.ops.kernels). Imports nothing but the standard library, so
setup.py can read it before r1mega is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"
NVCC_FLAGS = ["-O3"]  # torch adds its own -std and arch flags
CXX_FLAGS = ["-O3"]


def sources() -> List[Path]:
    """The CUDA sources and the torch bindings, in build order."""
    return sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp"]


def digest() -> str:
    """A hash of the sources: an ahead-of-time build carries the one it was built from, so a
    build older than the sources is noticed."""
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode())
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]
