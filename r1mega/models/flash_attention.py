"""Core attention on flash-attn (CUDA, no Transformer Engine); padded-free causal, packed THD and KV-cache layouts."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from r1mega.models.attention import SDPAttention


class FlashAttention(SDPAttention):
    """SDPAttention's interface on flash_attn_func / flash_attn_varlen_func.

    flash-attn aligns the causal mask bottom-right (>= 2.1), which is what decoding with a
    KV cache needs; an explicit padding mask, fp32 and value head dims unlike the query's fall back
    to SDPA.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        mask_type = attn_mask_type or self.attn_mask_type
        # flash-attn's kernels take one head dim for queries, keys and values (MLA's values are narrower)
        if attention_mask is not None or query.dtype == torch.float32 or value.size(-1) != query.size(-1):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        dropout = self.dropout_p if self.training else 0.0
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            p = packed_seq_params
            out = flash_attn_varlen_func(
                query, key, value, p.cu_seqlens_q, p.cu_seqlens_kv, p.max_seqlen_q, p.max_seqlen_kv,
                dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal,
            )
            return out.reshape(query.size(0), -1)
        # [s, b, h, d] -> [b, s, h, d]
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))
        out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal)
        return out.transpose(0, 1).reshape(query.size(0), query.size(1), -1)
