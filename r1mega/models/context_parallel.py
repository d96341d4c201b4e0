"""Which tokens of a THD pack a context-parallel rank holds: megatron's load-balanced two-chunk split.

Under causal attention a sequence's later tokens attend to more keys than its earlier ones, so
cutting it into `size` consecutive parts would leave the last rank with most of the work. megatron
(and Transformer Engine's THD kernels, `thd_get_partitioned_indices`) cut each sequence into
2 x size chunks instead; rank r holds chunks r and 2 x size - 1 - r, one cheap and one costly,
in that order. Every sequence of the pack is cut this way, so each is padded to a multiple of
2 x size first (`cu_seqlens_padded`). Rotary positions (megatron's `_apply_rotary_pos_emb_thd`),
the attention backends and the trainer's batch all read the layout from these boundaries.
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def chunk_spans(cu_seqlens_padded: torch.Tensor, rank: int, size: int) -> List[Tuple[int, int, int]]:
    """(sequence start, chunk start, chunk length) in the whole pack of each chunk rank `rank`
    holds, in its local order."""
    bounds = cu_seqlens_padded.tolist()
    spans = []
    for start, end in zip(bounds, bounds[1:]):
        if (end - start) % (2 * size):
            raise ValueError(f"a context-parallel pack needs every sequence padded to a multiple of "
                             f"2 x cp = {2 * size}; one spans {end - start} tokens")
        chunk = (end - start) // (2 * size)
        spans += [(start, start + rank * chunk, chunk), (start, start + (2 * size - 1 - rank) * chunk, chunk)]
    return spans


def local_positions(cu_seqlens_padded: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The pack positions rank `rank` holds, in its local order ([total / size] long)."""
    spans = chunk_spans(cu_seqlens_padded, rank, size)
    if not spans:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s, s + n) for _, s, n in spans])
