"""Files and folders written whole or not at all: a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same folder, renamed over `path` when complete."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the pid: writers in two processes never share it
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(tmp: Path, final: Path) -> None:
    """Make a completely written folder visible under its final name (replacing an old one)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
