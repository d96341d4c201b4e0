"""Build megatron-core GPTModel chunks from the model config, one per (virtual) pipeline stage."""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from packaging.version import Version

from r1mega.config.schema import ModelConfig, ParallelConfig
from r1mega.models import megatron_fixes
from r1mega.models.mtp import MTPGPTModel, mtp_block_spec
from r1mega.models.specs import decoder_block_spec, resolve_backend
from r1mega.platform import installed

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """megatron TransformerConfig for a Llama/Qwen-style decoder (dense, MoE or MLA)."""
    on_gpu = torch.cuda.is_available()
    dtype = DTYPES[model.dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim or model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm or model.mla is not None,  # MLA: the norms of the query and KV latents
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Initialise the full weight then split it: the same seed gives the same model under
        # every TP layout. (Not under EP: experts and later tensors draw differently; parity
        # checks across EP layouts load shared weights.) FP8 parameters are the exception:
        # Transformer Engine quantizes them as they are made, into CUDA memory, reading the
        # source as CUDA memory too, so they must be made on the GPU (per shard, TP-dependent).
        use_cpu_initialization=not (model.fp8.format is not None and model.fp8.param),
        # Fusions below are CUDA kernels (apex / TE / triton); megatron falls back to torch.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if parallel.pipeline_layout is not None:
        kwargs["pipeline_model_parallel_layout"] = _pipeline_layout(
            parallel.pipeline_layout, model.mtp.num_layers if model.mtp is not None else 0)
    if model.moe is not None:
        kwargs.update(_moe_kwargs(model))
    if model.mtp is not None:
        kwargs.update(mtp_num_layers=model.mtp.num_layers, mtp_loss_scaling_factor=model.mtp.loss_scale)
    if model.fp8.format is not None:
        kwargs.update(
            fp8=model.fp8.format,
            fp8_recipe=model.fp8.recipe,
            fp8_param=model.fp8.param,
            fp8_amax_history_len=model.fp8.amax_history_len,
            fp8_amax_compute_algo=model.fp8.amax_compute_algo,
        )
    if model.mla is not None:
        mla = model.mla
        kwargs.update(
            multi_latent_attention=True,
            q_lora_rank=mla.q_lora_rank,
            kv_lora_rank=mla.kv_lora_rank,
            qk_head_dim=mla.qk_head_dim,
            qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
            v_head_dim=mla.v_head_dim,
            rope_type="rope" if mla.yarn is None else "yarn",
            rotary_base=model.rotary_base,
        )
        if mla.yarn is not None:
            y = mla.yarn
            kwargs.update(rotary_scaling_factor=y.factor,
                          original_max_position_embeddings=y.original_max_position_embeddings,
                          beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                          mscale_all_dim=y.mscale_all_dim)
        else:  # megatron's MLA scales its softmax by YaRN's mscale whatever the rope type: make it 1
            kwargs.update(rotary_scaling_factor=1.0, mscale_all_dim=0.0)
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def _moe_kwargs(model: ModelConfig) -> dict:
    e = model.moe
    pattern = [0] * e.first_k_dense + [1] * (model.num_layers - e.first_k_dense)
    out = dict(
        num_moe_experts=e.num_experts,
        moe_ffn_hidden_size=e.ffn_hidden_size,
        moe_router_topk=e.router_topk,
        moe_shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=e.shared_expert_gate,
        moe_router_score_function=e.score_function,
        moe_router_pre_softmax=e.pre_softmax,
        moe_router_enable_expert_bias=e.expert_bias,
        moe_router_bias_update_rate=e.expert_bias_update_rate,
        moe_router_topk_scaling_factor=e.topk_scaling_factor,
        moe_router_num_groups=e.num_groups,
        moe_router_group_topk=e.group_topk,
        moe_aux_loss_coeff=e.aux_loss_coeff,
        moe_router_load_balancing_type=e.load_balancing_type,
        moe_z_loss_coeff=e.z_loss_coeff,
        moe_layer_freq=pattern,
        moe_grouped_gemm=e.grouped_gemm and resolve_backend(model.attention_backend) == "te",
        moe_token_dispatcher_type=e.token_dispatcher,
        moe_router_dtype=e.router_dtype,
    )
    if e.dense_ffn_hidden_size is not None:
        out["ffn_hidden_size"] = e.dense_ffn_hidden_size
    return out


def _pipeline_layout(layers_per_stage: List[int], mtp_layers: int = 0) -> list:
    """[2, 3, 3] -> megatron layout: embedding on the first stage, the MTP layers and the loss on the last."""
    stages = [["decoder"] * n for n in layers_per_stage]
    stages[0].insert(0, "embedding")
    stages[-1] += ["mtp"] * mtp_layers + ["loss"]
    return stages


def build_model(model: ModelConfig, parallel: ParallelConfig, initialize: bool = True) -> List[GPTModel]:
    """GPTModel chunks of this rank's pipeline stage (one, or vpp under interleaving); `initialize=False`
    leaves the weights uninitialised, for a model whose weights are loaded or copied next (megatron would
    otherwise draw every full weight matrix first)."""
    config = transformer_config(model, parallel)
    config.perform_initialization = initialize
    megatron_fixes.apply(config, f"model {model.name}")
    backend = resolve_backend(model.attention_backend)
    if model.mla is not None and parallel.cp > 1 and backend != "te":
        # SDPA's context parallelism gathers keys and values as one tensor of one head dim
        raise RuntimeError(f"model {model.name}: multi-latent attention under parallel.cp > 1 needs Transformer "
                           "Engine's attention (model.attention_backend=te)")
    if parallel.cp > 1 and backend == "flash":
        raise RuntimeError("parallel.cp > 1 runs on the te or sdpa attention backend; "
                           "set model.attention_backend=te or sdpa")
    if parallel.cp > 1 and model.mla is not None:
        check_mla_context_parallel(model.name, installed.version("transformer-engine"), model.fp8.format is not None)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp = parallel.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        vp = vp_stage if parallel.vpp else None
        spec = decoder_block_spec(config, backend, pp_rank=pp_rank, vp_stage=vp)
        mtp_spec = None if model.mtp is None else mtp_block_spec(config, spec, backend, pp_rank, vp)
        chunk = (GPTModel if model.mtp is None else MTPGPTModel)(
            config=config,
            transformer_layer_spec=spec,
            mtp_block_spec=mtp_spec,
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="none" if model.mla is not None else "rope",
            rotary_base=int(model.rotary_base),
            rope_scaling=model.rope_scaling_factor is not None,
            rope_scaling_factor=model.rope_scaling_factor or 8.0,
            vp_stage=vp,
        )
        if parallel.cp > 1 and getattr(chunk, "rotary_pos_emb", None) is not None:
            # megatron slices the rotary table to this rank's chunks for every input that is not a THD
            # pack; under r1mega's context parallelism only packs are split (packs slice by their
            # cu_seqlens instead), and other inputs (the native engine's) are whole sequences
            chunk.rotary_pos_emb.cp_group = None
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def check_mla_context_parallel(name: str, te_version: str | None, fp8: bool) -> None:
    """MLA under context parallelism needs Transformer Engine's fused attention: flash attention has no
    unequal query/value head dims, and no padding between sequences of a THD pack. Fused attention
    serves MLA under CP from Transformer Engine 2.5; 2.5 still turns it off under any FP8 autocast
    (2.6 only for FP8 attention itself). Without a backend TE would fail at the first forward."""
    if te_version is None:
        return  # build_model has refused MLA under context parallelism without TE attention already
    release = Version(te_version).release[:2]
    if release < (2, 5):
        raise RuntimeError(f"model {name}: multi-latent attention with parallel.cp > 1 needs Transformer Engine "
                           f">= 2.5 (installed: {te_version}; before 2.5 no attention backend takes MLA under "
                           f"context parallelism)")
    if fp8 and release < (2, 6):
        raise RuntimeError(f"model {name}: multi-latent attention with parallel.cp > 1 and model.fp8 needs "
                           f"Transformer Engine >= 2.6 (installed: {te_version}; 2.5 turns its fused attention "
                           f"off for MLA under context parallelism whenever FP8 is on)")


def attention_weights(model: ModelConfig) -> int:
    """Weights of one layer's attention projections (QKV and output; MLA: its low-rank ones and norms)."""
    if model.mla is not None:
        return _mla_params(model)
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    q, kv = model.num_attention_heads * head_dim, model.num_query_groups * head_dim
    return model.hidden_size * (q + 2 * kv) + q * model.hidden_size


def parameter_counts(model: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the full model, from the config alone (MTP layers included:
    each is a copy of the last decoder layer, two norms, a [2h -> h] projection and a final norm)."""
    h, L, V = model.hidden_size, model.num_layers, model.vocab_size
    head_dim = model.head_dim or h // model.num_attention_heads
    attn = attention_weights(model)
    if model.mla is None and model.add_qkv_bias:
        attn += (model.num_attention_heads + 2 * model.num_query_groups) * head_dim
    if model.mla is None and model.qk_layernorm:
        attn += 2 * head_dim
    norms = 2 * h
    embed = V * h * (1 if model.tie_word_embeddings else 2) + h
    mtp = model.mtp.num_layers if model.mtp is not None else 0
    mtp_own = 2 * h * h + 3 * h
    if model.moe is None:
        layer = attn + 3 * h * model.ffn_hidden_size + norms
        total = embed + L * layer + mtp * (layer + mtp_own)
        return total, total
    e = model.moe
    k = e.first_k_dense
    dense_ffn = 3 * h * (e.dense_ffn_hidden_size or model.ffn_hidden_size)
    expert = 3 * h * e.ffn_hidden_size
    shared = 3 * h * (e.shared_expert_ffn_hidden_size or 0)
    router = h * e.num_experts
    moe_layer_total = attn + norms + router + shared + e.num_experts * expert
    moe_layer_active = attn + norms + router + shared + e.router_topk * expert
    dense_layers = k * (attn + norms + dense_ffn)
    total = embed + dense_layers + (L - k) * moe_layer_total + mtp * (moe_layer_total + mtp_own)
    active = embed + dense_layers + (L - k) * moe_layer_active + mtp * (moe_layer_active + mtp_own)
    return total, active


def _mla_params(model: ModelConfig) -> int:
    m, h, n = model.mla, model.hidden_size, model.num_attention_heads
    qk = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = h * n * qk
    else:
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * qk
    kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * h
