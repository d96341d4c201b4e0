"""Dataset files written whole or not at all: a reader never sees a half-written JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable

from r1mega.platform.atomic import write_text_atomic


def write_jsonl(path: str | Path, rows: Iterable[Dict[str, Any]]) -> int:
    """Write rows to `path` through a temporary file renamed when complete; the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def write_json(path: str | Path, value: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")
