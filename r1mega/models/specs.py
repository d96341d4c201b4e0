"""Layer-spec choice: what is installed decides the backend.

Transformer Engine spec when TE imports (required for FP8); else megatron's local spec
with a flash-attn core attention on CUDA when flash-attn imports; else torch SDPA
(r1mega.platform.installed says what imports).
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.models.attention import SDPAttention
from r1mega.models.duplicated_linear import DuplicatedLinear
from r1mega.models.flash_attention import FlashAttention
from r1mega.models.norm import RMSNorm
from r1mega.models.self_attention import RotatedCacheSelfAttention
from r1mega.platform import installed


def resolve_backend(requested: str) -> str:
    """auto -> te | flash | sdpa by what imports; an explicit choice must be available."""
    available = {"te": installed.transformer_engine(), "flash": installed.flash_attn(), "sdpa": True}
    if requested == "auto":
        return next(name for name in ("te", "flash", "sdpa") if available[name])
    if not available[requested]:
        raise RuntimeError(
            f"model.attention_backend={requested} is not available here "
            f"(transformer_engine: {available['te']}, flash_attn: {available['flash']}); use auto"
        )
    return requested


def decoder_block_spec(
    config: TransformerConfig, backend: str, pp_rank: int | None = None, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Per-layer specs of this pipeline stage, dense and MoE layers as config.moe_layer_freq says."""
    use_te = backend == "te"
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    for layer in block.layer_specs:
        if layer.submodules.self_attention.module is SelfAttention:  # not MLA
            layer.submodules.self_attention.module = RotatedCacheSelfAttention
    if not use_te:
        core = _core_attention_module(backend)
        for layer in block.layer_specs:
            _localize(layer, core, config)
        block.layer_norm = RMSNorm
    return block


def _duplicated_down_projections(attn) -> None:
    """MLA's down-projections as one whole weight on every TP rank (Transformer Engine's spec has
    TELinear in "duplicated" mode), in place of the local spec's ColumnParallelLinear.

    With a column-split down-projection, megatron-core 0.16's MLASelfAttention.get_query_key_value_tensors
    gathers the KV latent and its rotary key part (k_pos_emb) from the TP ranks' shards
    (gather_from_tensor_model_parallel_region), and k_pos_emb goes to every rank whole. Each rank's
    gradient of it covers only that rank's heads, and the gather's backward splits it back without a
    sum: the rotary rows of linear_kv_down_proj got 1/TP of their gradient (GRPO steps under TP=2
    drifted from one rank's by 0.3% in the gradient norm). megatron's local `Linear` (modelopt) is duplicated
    as TELinear is: under sequence parallelism its input is this rank's tokens, k_pos_emb is gathered
    over the sequence (whose backward sums), and the weight carries `sequence_parallel`, so
    finalize_model_grads all-reduces its gradient over the TP group. (DuplicatedLinear is that Linear,
    initialised with the config's init_method.)"""
    attn.linear_q_down_proj = DuplicatedLinear
    attn.linear_kv_down_proj = DuplicatedLinear


def _core_attention_module(backend: str) -> type:
    if backend == "flash":
        return FlashAttention

    return SDPAttention


def _localize(layer: ModuleSpec, core: type, config: TransformerConfig) -> None:
    """Our core attention and RMSNorm in place of megatron's local ones (see their docstrings)."""
    sub = layer.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = core
    if hasattr(attn, "linear_kv_down_proj"):  # multi-latent attention
        _duplicated_down_projections(attn)
        if config.q_lora_rank is None:  # no query latent to normalise (megatron 0.19 refuses a norm there)
            attn.q_layernorm = IdentityOp
    for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
        if getattr(attn, name, None) not in (None, IdentityOp):
            setattr(attn, name, RMSNorm)
