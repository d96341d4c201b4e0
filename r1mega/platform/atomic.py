"""Small files written whole or not at all: a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same folder, renamed over `path` when complete."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the pid: writers in two processes never share it
    tmp.write_text(text)
    os.replace(tmp, path)
