"""Logging of every rank: one format, megatron-core's per-bucket INFO lines silenced, and the
third-party warnings known to be harmless collapsed into one line.

Without Apex and Transformer Engine (any CPU machine, many GPU ones), megatron-core warns at
import and at first use that it falls back to torch's optimizers, norms and multi-tensor ops, and
megatron and torch.distributed warn about deprecations inside their own code. They say nothing
a user can act on, and they bury the run's own lines, so they are held back and summed up in the
`backends:` line; any other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Dict, List, Tuple

# (pattern of the message, what it tells about the backends in use; None: a deprecation inside a library)
KNOWN_HARMLESS: List[Tuple[re.Pattern, str | None]] = [
    (re.compile(r"Transformer Engine and Apex are not installed\. Falling back to Torch optimizers"),
     "torch optimizers"),
    (re.compile(r"Transformer Engine and Apex are not installed\. Falling back to local implementations"),
     "local multi-tensor ops"),
    (re.compile(r"Apex is not installed\. Falling back to Torch Norm"), "torch norms"),
    (re.compile(r"full scope is deprecated"), None),  # megatron's own TransformerConfig default
    (re.compile(r"`torch\.distributed\.\w+` is deprecated"), None),  # megatron's collectives
    (re.compile(r"deprecating ShardedTensor|`load_state_dict` is deprecated"), None),  # its checkpointing
    # megatron's CPU path reads .grad of non-leaf tensors inside its autograd functions
    (re.compile(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"), None),
]
_HELD: Dict[str, int] = {}  # label ("" for deprecations) -> warnings held back
_SHOW = warnings.showwarning


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    for pattern, label in KNOWN_HARMLESS:
        if pattern.search(text):
            _HELD[label or ""] = _HELD.get(label or "", 0) + 1
            return
    _SHOW(message, category, filename, lineno, file, line)


def collapse_known_warnings() -> None:
    """Hold back the known-harmless warnings from now on (before megatron-core is imported)."""
    warnings.showwarning = _show


def backends_line() -> str:
    """One line in place of the warnings held back so far."""
    fallbacks = sorted(k for k in _HELD if k)
    parts = [f"no Apex or Transformer Engine: {', '.join(fallbacks)}"] if fallbacks else []
    if _HELD.get(""):
        parts.append(f"{_HELD['']} deprecation warnings inside megatron-core and torch hidden")
    return "backends: " + ("; ".join(parts) if parts else "as installed")


def setup_logging() -> None:
    """INFO to stderr; called in each rank (spawned ranks do not inherit the parent's handlers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    # megatron-core logs every parameter of every gradient bucket at INFO
    logging.getLogger("megatron").setLevel(logging.WARNING)
