"""DAPO's soft overlong punishment."""

from __future__ import annotations


def overlong_penalty(num_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """0 up to max - cache tokens, then linearly down to -1 at max tokens, -1 beyond."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if not 0 <= cache_tokens <= max_tokens:
        raise ValueError(f"cache_tokens must be in [0, max_tokens={max_tokens}], got {cache_tokens}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    free = max_tokens - cache_tokens
    if num_tokens <= free:
        return 0.0
    if num_tokens > max_tokens:
        return -1.0
    return (free - num_tokens) / cache_tokens
