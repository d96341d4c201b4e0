"""Which optional GPU packages this machine can really use: Transformer Engine and flash-attn.

A package counts only when it imports. Built against another torch (an ABI mismatch: "undefined
symbol" in its extension), it is found on disk but fails on import; such a package is treated as
absent, with one warning line that says why, and r1mega falls back (TE: the local layer spec;
flash-attn: SDPA). Both need CUDA: on a machine without a GPU neither counts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


def _import_error(module: str) -> Optional[str]:
    """None when `module` imports, else why not (ImportError, OSError from a shared library, ...)."""
    try:
        importlib.import_module(module)
    except Exception as err:  # an extension built against another torch raises more than ImportError
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return None


@functools.cache
def transformer_engine() -> bool:
    """Whether Transformer Engine's PyTorch modules import here (on a CUDA machine)."""
    return torch.cuda.is_available() and _usable("transformer_engine", "transformer_engine.pytorch", "the local spec")


@functools.cache
def flash_attn() -> bool:
    """Whether flash-attn imports here (on a CUDA machine)."""
    return torch.cuda.is_available() and _usable("flash_attn", "flash_attn", "SDPA attention")


def version(package: str) -> Optional[str]:
    """The installed distribution's version string, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _usable(package: str, module: str, fallback: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False  # not installed: nothing to say
    error = _import_error(module)
    if error is not None:
        log.warning("%s is installed but does not import (%s); using %s instead", package, error, fallback)
        return False
    return True
