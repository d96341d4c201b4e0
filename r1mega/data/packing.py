"""SFT micro-batches: THD packs (samples back to back, attention kept inside each) or padded rows.

In a pack the model reads tokens[:-1] of every sample, one after another in a single row,
with megatron's packed-sequence parameters (cu_seqlens) telling attention and rotary
embeddings where each sample starts: nothing attends across samples, positions restart.
Padded rows are the unpacked reference: same samples, same targets, right padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from r1mega.data.balance import token_bins
from r1mega.data.conversations import SFTSample


@dataclass
class SFTMicroBatch:
    tokens: torch.Tensor  # [b, L] model input
    targets: torch.Tensor  # [b, L] next tokens
    mask: torch.Tensor  # [b, L] bool: the target is an assistant token
    positions: torch.Tensor  # [b, L]
    cu_seqlens: Optional[torch.Tensor] = None  # [n + 1] int32 sample boundaries of a pack (b = 1)
    max_seqlen: int = 0
    pad: Optional[torch.Tensor] = None  # [b, L] bool: padding, which MoE routers leave out of their losses

    def to(self, device) -> "SFTMicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SFTMicroBatch(move(self.tokens), move(self.targets), move(self.mask), move(self.positions),
                             move(self.cu_seqlens), self.max_seqlen, move(self.pad))

    def targets_by_position(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(next token, whether the loss reads it) at every input position, [b, L]."""
        return self.targets, self.mask

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of GPTModel.forward for this micro-batch."""
        return {"input_ids": self.tokens, "position_ids": self.positions, "attention_mask": None,
                "packed_seq_params": thd_params(self.cu_seqlens, self.max_seqlen), "padding_mask": self.pad}


def thd_params(cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
               cu_seqlens_padded: Optional[torch.Tensor] = None) -> Optional[PackedSeqParams]:
    """megatron's packed-sequence parameters of a THD pack (None: not a pack). With
    `cu_seqlens_padded` (context parallelism), `cu_seqlens` counts each sequence's real tokens and
    `cu_seqlens_padded` marks where each sequence starts in the pack, as Transformer Engine reads them."""
    if cu_seqlens is None:
        return None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def split_rows(lengths: Sequence[int], rows: Sequence[int], token_budget: int, min_parts: int = 1) -> List[List[int]]:
    """Group rows into micro-batches of at most token_budget padded tokens (longest rows first).

    A row longer than the budget gets a micro-batch of its own. At least min_parts groups are
    made when there are that many rows (ranks that must run the same number of forwards).
    """
    order = sorted(rows, key=lambda i: -lengths[i])
    groups: List[List[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    while len(groups) < min(min_parts, len(order)):
        big = max(range(len(groups)), key=lambda g: len(groups[g]))
        half = len(groups[big]) // 2
        groups[big:big + 1] = [groups[big][:half], groups[big][half:]]
    return groups


def pack(samples: Sequence[SFTSample], budget: int, multiple: int = 1, min_parts: int = 1) -> List[SFTMicroBatch]:
    """THD packs of whole samples, at most `budget` tokens each (a longer sample alone) and balanced
    in tokens; the pack length is rounded up to `multiple` (sequence parallelism) with a padding
    segment that carries no loss."""
    out = []
    for members in token_bins([len(s) - 1 for s in samples], budget, min_parts):
        tokens, targets, mask, positions, cu = [], [], [], [], [0]
        for i in members:
            s = samples[i]
            n = len(s) - 1
            tokens += s.tokens[:-1]
            targets += s.tokens[1:]
            mask += s.assistant[1:]
            positions += range(n)
            cu.append(cu[-1] + n)
        pad = -len(tokens) % multiple
        if pad:
            tokens += [0] * pad
            targets += [0] * pad
            mask += [False] * pad
            positions += range(pad)
            cu.append(cu[-1] + pad)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        row = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype).unsqueeze(0)  # noqa: E731
        is_pad = torch.zeros(1, len(tokens), dtype=torch.bool)
        is_pad[0, len(tokens) - pad:] = True
        out.append(SFTMicroBatch(row(tokens), row(targets), row(mask, torch.bool), row(positions),
                                 torch.tensor(cu, dtype=torch.int32), max(lengths), is_pad))
    return out


def pad_rows(samples: Sequence[SFTSample], budget: int, multiple: int = 1, min_parts: int = 1
             ) -> List[SFTMicroBatch]:
    """Right-padded [b, L] micro-batches of at most `budget` padded tokens (the unpacked layout)."""
    lengths = [len(s) - 1 for s in samples]
    out = []
    for rows in split_rows(lengths, range(len(samples)), budget, min_parts):
        width = -(-max(lengths[i] for i in rows) // multiple) * multiple
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros_like(tokens)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        is_pad = torch.ones(len(rows), width, dtype=torch.bool)
        for j, i in enumerate(sorted(rows)):
            s, n = samples[i], lengths[i]
            is_pad[j, :n] = False
            tokens[j, :n] = torch.tensor(s.tokens[:-1])
            targets[j, :n] = torch.tensor(s.tokens[1:])
            mask[j, :n] = torch.tensor(s.assistant[1:])
        positions = torch.arange(width).expand(len(rows), width).contiguous()
        out.append(SFTMicroBatch(tokens, targets, mask, positions, pad=is_pad))
    return out
