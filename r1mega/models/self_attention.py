"""megatron-core's SelfAttention, with keys kept rotated in the static KV cache.

Under static batching megatron caches keys before RoPE and rotates the whole cache again at
every decode step, work that grows with the sequence (its flash-decode path avoids that, but
needs flash-attn's kv-cache kernel). Here each new key is rotated once, at its position, before
it is stored, as megatron's dynamic-batching path does; attention sees the same keys.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, _yarn_get_concentration_factor_from_config


class RotatedCacheSelfAttention(SelfAttention):
    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.size(0)], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, (q_pos_emb, k_pos_emb), *args, **kwargs)
        return query, key, value, (rotary_pos_emb[0], None), mask_type, block_table  # cached keys are rotated
