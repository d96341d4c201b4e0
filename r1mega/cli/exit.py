"""How an entry point ends on an error it can name: one line on stderr, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr, then exit."""
    print(f"r1mega: error: {message}", file=sys.stderr)
    sys.exit(code)
