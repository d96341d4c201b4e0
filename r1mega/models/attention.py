"""Core attention on torch's scaled_dot_product_attention.

Used where neither Transformer Engine nor flash-attn is installed (CPU, or a bare CUDA
torch). megatron-core's own DotProductAttention rejects packed sequences and allocates
its score buffer through a CUDA global memory buffer; this module handles padded,
causal, packed (THD, block-diagonal causal) and KV-cache (query shorter than key) layouts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` submodule for megatron-core's SelfAttention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, h, d] -> [1, h, t, d]; one block-diagonal causal mask over the pack
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            out = self._packed(q, k, v, packed_seq_params, dropout)
            return out.transpose(1, 2).reshape(query.size(0), -1)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        sq, sk = q.size(2), k.size(2)
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
            if mask_type == AttnMaskType.causal or sq != sk:
                mask = mask & _causal(sq, sk, q.device)
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                causal = True
            else:  # decoding with a KV cache: queries are the last sq positions
                mask = _causal(sq, sk, q.device)
        out = self._sdpa(q, k, v, mask, causal, dropout)
        return out.permute(2, 0, 1, 3).reshape(sq, out.size(0), -1)

    def _packed(self, q, k, v, params: PackedSeqParams, dropout: float) -> torch.Tensor:
        """Causal attention inside each segment of a pack ([1, h, t, d]).

        When queries and keys share the boundaries (training packs), segments of similar length
        are gathered into a right-padded batch and go through one causal SDPA call each: a mask
        over the whole pack would cost t^2 scores, the buckets about the sum of the segments'
        squares, in a few calls rather than one per segment. Padding sits after each segment's
        tokens, so causality keeps every real query off it; padded queries are dropped.
        """
        cu_q, cu_k = _bounds(params, "q"), _bounds(params, "kv")
        t = q.size(2)
        if k.size(2) != t or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            return self._sdpa(q, k, v, packed_causal_mask(params, t, k.size(2), q.device), False, dropout)
        bounds = [b for b in cu_q.tolist() if b < t] + [t]
        segments = [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
        pieces, order = [], []
        for bucket in _length_buckets(segments):
            width = bucket[0][1]
            starts, lengths = (torch.tensor(c, device=q.device) for c in zip(*bucket))
            steps = torch.arange(width, device=q.device)
            index = starts[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)  # [n, width]
            rows = [x[0][:, index].transpose(0, 1) for x in (q, k, v)]  # [n, h, width, d]
            o = self._sdpa(*rows, None, True, dropout).transpose(0, 1).flatten(1, 2)  # [h, n * width, d]
            real = (steps[None, :] < lengths[:, None]).flatten().nonzero().squeeze(1)
            pieces.append(o.index_select(1, real))
            order.append(index.flatten()[real])
        inverse = torch.empty(t, dtype=torch.long, device=q.device)
        inverse[torch.cat(order)] = torch.arange(t, device=q.device)
        return torch.cat(pieces, dim=1).index_select(1, inverse).unsqueeze(0)

    def _sdpa(self, q, k, v, mask, causal, dropout):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_groups,
        )


def _causal(sq: int, sk: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask [sq, sk], True = attend."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def _length_buckets(segments, slack: float = 1.25):
    """(start, length) segments grouped longest first: a bucket's padded cost (count x longest^2)
    stays within `slack` times the sum of its segments' squares."""
    buckets = []
    for seg in sorted(segments, key=lambda s: -s[1]):
        if buckets:
            b = buckets[-1]
            width = b[0][1]
            if (len(b) + 1) * width * width <= slack * (sum(n * n for _, n in b) + seg[1] ** 2):
                b.append(seg)
                continue
        buckets.append([seg])
    return buckets


def _bounds(params: PackedSeqParams, side: str) -> torch.Tensor:
    """A pack's segment boundaries for queries ("q") or keys ("kv"), padded ones where given."""
    padded = getattr(params, f"cu_seqlens_{side}_padded")
    return padded if padded is not None else getattr(params, f"cu_seqlens_{side}")


def packed_causal_mask(params: PackedSeqParams, sq: int, sk: int, device) -> torch.Tensor:
    """Block-diagonal causal mask for a THD pack: no token attends across samples."""
    cu_q, cu_k = _bounds(params, "q"), _bounds(params, "kv")
    seg_q = _segment_ids(cu_q, sq, device)
    seg_k = _segment_ids(cu_k, sk, device)
    same = seg_q[:, None] == seg_k[None, :]
    return same & _causal(sq, sk, device)


def _segment_ids(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    pos = torch.arange(total, device=device)
    return torch.searchsorted(cu_seqlens.to(device)[1:], pos, right=True)


def _tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()
