"""Core attention on torch's scaled_dot_product_attention.

Used where neither Transformer Engine nor flash-attn is installed (CPU, or a bare CUDA
torch). megatron-core's own DotProductAttention rejects packed sequences and allocates
its score buffer through a CUDA global memory buffer; this module handles padded,
causal, packed (THD, block-diagonal causal) and KV-cache (query shorter than key) layouts,
and context parallelism over THD packs.

Context parallelism here is the all-gather-KV form of Llama 3's training: each rank gathers
the keys and values of the whole pack (a few heads of [tokens, head_dim], small next to the
activations) and attends with its own query chunks under their causal offsets; the gather's
backward reduce-scatters the key and value gradients to their owners. Transformer Engine's
attention runs megatron's ring exchange instead; both read the same two-chunk layout
(r1mega.models.context_parallel). Inputs that are not THD packs (the native engine's prefill
and decode) are whole sequences on every rank and attend as without context parallelism.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from r1mega.models.context_parallel import chunk_spans, local_positions


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
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
    ):
        """k_channels, v_channels: multi-latent attention's query/key and value head dims, which differ;
        SDPA takes them as they come (its softmax_scale is MLA's own)."""
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_world_size()
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        head_dim = k_channels or config.kv_channels
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
            split = self.cp_group is not None and self.cp_group.size() > 1
            out = (self._packed_cp if split else self._packed)(q, k, v, packed_seq_params, dropout)
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
        """Causal attention inside each segment of a pack ([1, h, t, d])."""
        cu_q, cu_k = _bounds(params, "q"), _bounds(params, "kv")
        t = q.size(2)
        if k.size(2) != t or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            return self._sdpa(q, k, v, packed_causal_mask(params, t, k.size(2), q.device), False, dropout)
        bounds = [b for b in cu_q.tolist() if b < t] + [t]
        return self._spans(q, k, v, [(a, b - a, a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a], dropout)

    def _packed_cp(self, q, k, v, params: PackedSeqParams, dropout: float) -> torch.Tensor:
        """This rank's chunks of every segment ([1, h, t / cp, d]) against the whole pack's keys.

        A chunk at pack positions [s, s + n) of a segment starting at a attends to keys [a, s + n):
        bottom-right aligned causal, the keys before the chunk all visible."""
        bounds = tuple(_bounds(params, "q").tolist())
        if bounds != tuple(_bounds(params, "kv").tolist()):
            raise ValueError("context-parallel SDPA attention needs queries and keys of the same pack")
        whole, spans = _cp_layout(bounds, self.cp_group.rank(), self.cp_group.size())
        heads = k.size(1)
        # one gather of keys and values: [t / cp, 2 g, d] per rank -> [t, 2 g, d] in rank order
        mine = torch.cat([k, v], dim=1)[0].transpose(0, 1).contiguous()
        gathered = gather_from_sequence_parallel_region(mine, tensor_parallel_output_grad=True, group=self.cp_group)
        kv = gathered.index_select(0, whole.to(q.device)).transpose(0, 1).unsqueeze(0)  # [1, 2 g, t, d], pack order
        k_all, v_all = kv[:, :heads], kv[:, heads:]
        return self._spans(q, k_all, v_all, list(spans), dropout)

    def _spans(self, q, k, v, spans, dropout: float) -> torch.Tensor:
        """Queries [q0, q0 + nq) of `q` ([1, h, t, d]) against keys [k0, k0 + nk) of `k` and `v`,
        bottom-right aligned causal (nk >= nq), for every (q0, nq, k0, nk) in `spans`; the spans'
        queries cover `q` once.

        Spans of similar shape are gathered into a right-padded batch and go through one SDPA call
        each: a mask over the whole pack would cost t^2 scores, the buckets about the sum of the
        spans' nq x nk, in a few calls rather than one per span. Padded keys lie past every real
        query's causal limit; padded queries are dropped.
        """
        t = q.size(2)
        pieces, order = [], []
        for bucket in _span_buckets(spans):
            q0, nq, k0, nk = (torch.tensor(c, device=q.device) for c in zip(*bucket))
            wq, wk = int(nq.max()), int(nk.max())
            sq, sk = torch.arange(wq, device=q.device), torch.arange(wk, device=q.device)
            qi = q0[:, None] + torch.minimum(sq[None, :], nq[:, None] - 1)  # [n, wq]
            ki = k0[:, None] + torch.minimum(sk[None, :], nk[:, None] - 1)  # [n, wk]
            rows_q = q[0][:, qi].transpose(0, 1)  # [n, h, wq, d]
            rows_k, rows_v = (x[0][:, ki].transpose(0, 1) for x in (k, v))
            offset = nk - nq
            if bool((offset == 0).all()):  # training packs without context parallelism
                o = self._sdpa(rows_q, rows_k, rows_v, None, True, dropout)
            else:
                mask = sk[None, None, :] <= sq[None, :, None] + offset[:, None, None]  # [n, wq, wk]
                o = self._sdpa(rows_q, rows_k, rows_v, mask.unsqueeze(1), False, dropout)
            o = o.transpose(0, 1).flatten(1, 2)  # [h, n * wq, d]
            real = (sq[None, :] < nq[:, None]).flatten().nonzero().squeeze(1)
            pieces.append(o.index_select(1, real))
            order.append(qi.flatten()[real])
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


@functools.lru_cache(maxsize=64)
def _cp_layout(bounds: tuple, rank: int, size: int):
    """For a pack's padded bounds (the same in every layer of a forward): the gathered row of each pack
    position, and this rank's spans (local query start, length, sequence start, keys up to the chunk's end)."""
    cu = torch.tensor(bounds)
    held = torch.cat([local_positions(cu, r, size) for r in range(size)])
    whole = torch.empty_like(held)
    whole[held] = torch.arange(held.numel())  # pack position -> gathered row
    spans, local = [], 0
    for segment, s, n in chunk_spans(cu, rank, size):
        if n:
            spans.append((local, n, segment, s + n - segment))
        local += n
    return whole, tuple(spans)


def _span_buckets(spans, slack: float = 1.25):
    """(q0, nq, k0, nk) spans grouped, largest first: a bucket's padded cost (count x widest
    queries x widest keys) stays within `slack` times the sum of its spans' nq x nk."""
    buckets = []
    for span in sorted(spans, key=lambda s: (-s[3], -s[1])):
        if buckets:
            b = buckets[-1]
            wq, wk = max(max(x[1] for x in b), span[1]), b[0][3]
            if (len(b) + 1) * wq * wk <= slack * (sum(x[1] * x[3] for x in b) + span[1] * span[3]):
                b.append(span)
                continue
        buckets.append([span])
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
