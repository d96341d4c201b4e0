"""Names and layouts: which HF tensors make up each megatron-core parameter.

A megatron parameter maps to one or more HF tensors with one of three layouts:
  plain  one HF tensor, split along the parameter's `partition_dim` under tensor parallelism
  qkv    q, k, v projections interleaved per query group: [g0: q.. k v | g1: q.. k v | ...]
  glu    gate and up projections stacked, each split separately: [gate_r; up_r] on rank r
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from r1mega.config.schema import ModelConfig

# Transformer Engine fuses norms into the next linear; these are the local-spec names.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_LAYER_RULES = {
    "input_layernorm.weight": ("plain", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.weight": ("qkv", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"]),
    "self_attention.linear_qkv.bias": ("qkv", ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias"]),
    "self_attention.linear_proj.weight": ("plain", ["self_attn.o_proj.weight"]),
    "self_attention.q_layernorm.weight": ("plain", ["self_attn.q_norm.weight"]),
    "self_attention.k_layernorm.weight": ("plain", ["self_attn.k_norm.weight"]),
    "pre_mlp_layernorm.weight": ("plain", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": ("glu", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": ("plain", ["mlp.down_proj.weight"]),
    "mlp.router.weight": ("plain", ["mlp.gate.weight"]),
    "mlp.router.expert_bias": ("plain", ["mlp.gate.e_score_correction_bias"]),  # a buffer (DeepSeek-V3)
    "mlp.shared_experts.linear_fc1.weight": ("glu", ["mlp.shared_expert.gate_proj.weight",
                                                     "mlp.shared_expert.up_proj.weight"]),
    "mlp.shared_experts.linear_fc2.weight": ("plain", ["mlp.shared_expert.down_proj.weight"]),
    "mlp.shared_experts.gate_weight": ("plain", ["mlp.shared_expert_gate.weight"]),
}

# multi-latent attention (DeepSeek-V3), in place of the qkv and q/k-norm rules
_MLA_RULES = {
    "self_attention.linear_q_proj.weight": ("plain", ["self_attn.q_proj.weight"]),  # no query latent (q_lora_rank)
    "self_attention.linear_q_down_proj.weight": ("plain", ["self_attn.q_a_proj.weight"]),
    "self_attention.q_layernorm.weight": ("plain", ["self_attn.q_a_layernorm.weight"]),
    "self_attention.linear_q_up_proj.weight": ("plain", ["self_attn.q_b_proj.weight"]),
    "self_attention.linear_kv_down_proj.weight": ("plain", ["self_attn.kv_a_proj_with_mqa.weight"]),
    "self_attention.kv_layernorm.weight": ("plain", ["self_attn.kv_a_layernorm.weight"]),
    "self_attention.linear_kv_up_proj.weight": ("plain", ["self_attn.kv_b_proj.weight"]),
}
# DeepSeek-V3 names its shared experts in the plural and has no shared-expert gate
_DEEPSEEK_SHARED_RULES = {
    "mlp.shared_experts.linear_fc1.weight": ("glu", ["mlp.shared_experts.gate_proj.weight",
                                                     "mlp.shared_experts.up_proj.weight"]),
    "mlp.shared_experts.linear_fc2.weight": ("plain", ["mlp.shared_experts.down_proj.weight"]),
}
_MLA_TE_ALIASES = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}

_EXPERT_RULES = {
    "linear_fc1.weight": ("glu", ["gate_proj.weight", "up_proj.weight"]),
    "linear_fc2.weight": ("plain", ["down_proj.weight"]),
}

_GLOBAL_RULES = {
    "embedding.word_embeddings.weight": ("plain", ["model.embed_tokens.weight"]),
    "decoder.final_layernorm.weight": ("plain", ["model.norm.weight"]),
    "output_layer.weight": ("plain", ["lm_head.weight"]),
}

# a multi-token-prediction layer (DeepSeek-V3's, HF layer num_hidden_layers + d): its own norms and
# projection, around a decoder layer (megatron-core 0.16 names it transformer_layer, 0.17+ mtp_model_layer);
# it shares the model's embedding and output layer, which HF checkpoints repeat in each MTP layer
_MTP_OWN_RULES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}
_MTP_INNER = ("transformer_layer.", "mtp_model_layer.")
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


@dataclass(frozen=True)
class Rule:
    layout: str  # plain | qkv | glu
    hf_names: List[str]
    is_expert: bool = False


def rule_for(name: str, layer_number: Optional[int], expert_offset: int, model: ModelConfig) -> Rule:
    """HF sources of megatron parameter `name` (chunk-local name).

    layer_number: 1-based global layer number of the decoder layer holding `name`;
    expert_offset: global index of this rank's first local expert.
    """
    if name in _GLOBAL_RULES:
        layout, hf = _GLOBAL_RULES[name]
        if name == "output_layer.weight" and model.tie_word_embeddings:
            hf = ["model.embed_tokens.weight"]
        return Rule(layout, hf)
    mtp = _MTP_RE.match(name)
    if mtp is not None:
        return _mtp_rule(name, int(mtp.group(1)), mtp.group(2), expert_offset, model)
    match = _LAYER_RE.match(name)
    if match is None or layer_number is None:
        raise KeyError(f"megatron parameter {name!r} has no HF counterpart")
    return _layer_rule(name, match.group(2), f"model.layers.{layer_number - 1}.", expert_offset, model)


def mtp_layers(model: ModelConfig) -> int:
    """Multi-token-prediction layers the model holds (HF layers num_layers .. num_layers + this - 1)."""
    return model.mtp.num_layers if model.mtp is not None else 0


def decoder_tensor(hf_name: str, model: ModelConfig) -> bool:
    """Is HF tensor `hf_name` not one of the MTP layers' (what an engine decoding without them needs)?"""
    match = _HF_LAYER_RE.match(hf_name)
    return match is None or int(match.group(1)) < model.num_layers


def _mtp_rule(name: str, depth: int, rest: str, expert_offset: int, model: ModelConfig) -> Rule:
    prefix = f"model.layers.{model.num_layers + depth}."
    if rest in _MTP_OWN_RULES:
        return Rule("plain", [prefix + _MTP_OWN_RULES[rest]])
    for inner in _MTP_INNER:
        if rest.startswith(inner):
            return _layer_rule(name, rest[len(inner):], prefix, expert_offset, model)
    raise KeyError(f"megatron parameter {name!r} has no HF counterpart")


def _layer_rule(name: str, rest: str, prefix: str, expert_offset: int, model: ModelConfig) -> Rule:
    """The rule of a decoder layer's parameter `rest`, the layer's HF names starting with `prefix`."""
    rest = _TE_ALIASES.get(rest, rest)
    if model.mla is not None:  # DeepSeek-V2 and V3
        rest = _MLA_TE_ALIASES.get(rest, rest)
        own = _MLA_RULES.get(rest) or _DEEPSEEK_SHARED_RULES.get(rest)
        if own is not None:
            return Rule(own[0], [prefix + n for n in own[1]])
    expert = _expert_rule(rest, prefix, expert_offset)
    if expert is not None:
        return expert
    if rest not in _LAYER_RULES:
        raise KeyError(f"megatron parameter {name!r} has no HF counterpart")
    layout, hf = _LAYER_RULES[rest]
    return Rule(layout, [prefix + n for n in hf])


def _expert_rule(rest: str, prefix: str, expert_offset: int) -> Optional[Rule]:
    local = _LOCAL_EXPERT_RE.match(rest)
    if local is not None:
        index, tail = int(local.group(1)), local.group(2)
    else:
        grouped = _GROUPED_EXPERT_RE.match(rest)  # TEGroupedMLP: linear_fc1.weight<e>
        if grouped is None:
            return None
        index, tail = int(grouped.group(2)), grouped.group(1) + ".weight"
    if tail not in _EXPERT_RULES:
        raise KeyError(f"expert parameter {rest!r} has no HF counterpart")
    layout, hf = _EXPERT_RULES[tail]
    expert = expert_offset + index
    return Rule(layout, [f"{prefix}mlp.experts.{expert}.{n}" for n in hf], is_expert=True)
