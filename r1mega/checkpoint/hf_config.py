"""HF config.json <-> r1mega ModelConfig for the supported families."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Tuple

from r1mega.config.schema import MLAConfig, ModelConfig, MoEConfig, YarnConfig

# HF architecture -> r1mega arch
ARCHS = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")  # multi-latent attention, DeepSeekMoE
HF_ARCH = {v: k for k, v in ARCHS.items()}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "qwen3_moe": "qwen3_moe",
              "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}


class UnsupportedModelError(ValueError):
    """An HF checkpoint whose architecture or options r1mega cannot convert."""


def read_hf_config(path: str | Path) -> Dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the HF checkpoint folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _rope_theta(hf: Dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling_entry(hf: Dict[str, Any]) -> Tuple[str | None, Dict[str, Any]]:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return (None if kind in (None, "default") else kind), scaling


def _rope_scaling(hf: Dict[str, Any], where: str) -> float | None:
    kind, scaling = _rope_scaling_entry(hf)
    if kind is None:
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"{where}: rope_type={kind!r} is not supported (default, llama3)")
    # megatron's rope_scaling implements Llama 3.1's rule with these constants.
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key, value in expected.items():
        if float(scaling.get(key, value)) != value:
            raise UnsupportedModelError(f"{where}: llama3 rope {key}={scaling[key]} (supported: {value})")
    return float(scaling["factor"])


def model_config_from_hf(path: str | Path, name: str | None = None) -> ModelConfig:
    """ModelConfig for the HF checkpoint at `path` (config.json only)."""
    hf = read_hf_config(path)
    where = str(Path(path) / "config.json")
    archs = hf.get("architectures") or []
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None and not archs:  # a bare config.json names only its model_type
        arch = {v: k for k, v in MODEL_TYPE.items()}.get(hf.get("model_type"))
    if arch is None:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} (model_type={hf.get('model_type')!r}) not supported; "
            f"r1mega converts {sorted(ARCHS)}"
        )
    heads = hf["num_attention_heads"]
    mla = arch in DEEPSEEK
    cfg = ModelConfig(
        name=name or Path(path).name,
        arch=arch,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=None if mla else hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=_rope_theta(hf),
        rope_scaling_factor=None if mla else _rope_scaling(hf, where),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=arch in ("qwen3", "qwen3_moe"),
        add_qkv_bias=arch == "qwen2" or (not mla and bool(hf.get("attention_bias", False))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), "fp32"),
    )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={hf['hidden_act']} (supported: silu)")
    if arch == "qwen3_moe":
        cfg.moe = _qwen3_moe(hf, where)
    if mla:
        # transformers' DeepSeek configs fill absent keys with the released models' sizes; reading them raw
        # would not
        missing = [k for k in DEEPSEEK_KEYS[arch] if k not in hf]
        if missing:
            raise UnsupportedModelError(f"{where}: {HF_ARCH[arch]} config without {', '.join(missing)}")
        cfg.mla = _mla(hf, where)
        cfg.moe = _deepseek_moe(hf, where, arch)
    return cfg


_DEEPSEEK_COMMON = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "first_k_dense_replace", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "n_shared_experts", "routed_scaling_factor")
DEEPSEEK_KEYS = {"deepseek_v3": _DEEPSEEK_COMMON + ("n_group", "topk_group"),
                 "deepseek_v2": _DEEPSEEK_COMMON + ("topk_method",)}


def _mla(hf: Dict[str, Any], where: str) -> MLAConfig:
    """DeepSeek-V3's multi-latent attention and its YaRN rotary scaling."""
    if hf.get("attention_bias"):
        raise UnsupportedModelError(f"{where}: attention_bias=true with multi-latent attention is not supported")
    if hf.get("rope_interleave") is False:  # megatron's MLA takes rotary pairs interleaved, as DeepSeek lays them out
        raise UnsupportedModelError(f"{where}: rope_interleave=false is not supported (DeepSeek-V3 checkpoints "
                                    "interleave their rotary dimensions)")
    kind, scaling = _rope_scaling_entry(hf)
    yarn = None
    if kind == "yarn":
        yarn = _yarn(hf, scaling, where)
    elif kind is not None:
        raise UnsupportedModelError(f"{where}: rope_type={kind!r} with multi-latent attention is not supported "
                                    "(default, yarn)")
    return MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                     qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
                     v_head_dim=hf["v_head_dim"], yarn=yarn)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(hf: Dict[str, Any], scaling: Dict[str, Any], where: str) -> YarnConfig:
    """YaRN as transformers reads it (modeling_rope_utils._compute_yarn_parameters), refused where
    megatron's YarnRotaryEmbedding would scale otherwise."""
    if scaling.get("attention_factor") is not None or scaling.get("truncate", True) is False:
        raise UnsupportedModelError(f"{where}: yarn attention_factor / truncate=false are not supported "
                                    "(megatron derives the factor from mscale and mscale_all_dim)")
    if "original_max_position_embeddings" not in scaling:
        raise UnsupportedModelError(f"{where}: yarn rope scaling without original_max_position_embeddings")
    original = int(scaling["original_max_position_embeddings"])
    factor = float(scaling.get("factor") or hf.get("max_position_embeddings", original) / original)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    # transformers scales cos/sin by mscale(f, m) / mscale(f, m_all) only when both are set (and
    # non-zero), else by mscale(f); megatron always by the ratio, so the two must agree
    theirs = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
              else _yarn_mscale(factor))
    m = 1.0 if mscale is None else float(mscale)
    m_all = 0.0 if mscale_all_dim is None else float(mscale_all_dim)
    if abs(_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) - theirs) > 1e-12:
        raise UnsupportedModelError(f"{where}: yarn mscale={mscale} with mscale_all_dim={mscale_all_dim} is not "
                                    "supported (transformers and megatron scale the rotary embedding differently)")
    return YarnConfig(factor=factor, original_max_position_embeddings=original,
                      beta_fast=float(scaling.get("beta_fast") or 32.0),
                      beta_slow=float(scaling.get("beta_slow") or 1.0), mscale=m, mscale_all_dim=m_all)


# what the family's router reads (transformers' DeepseekV3TopkRouter, DeepseekV2TopkRouter); megatron routes so
_DEEPSEEK_ROUTER = {
    "deepseek_v3": (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("norm_topk_prob", True),
                    ("moe_layer_freq", 1)),
    "deepseek_v2": (("scoring_func", "softmax"), ("norm_topk_prob", False), ("moe_layer_freq", 1)),
}


def _deepseek_moe(hf: Dict[str, Any], where: str, arch: str) -> MoEConfig | None:
    """DeepSeekMoE: routed experts (routing by family) and shared experts after the first, dense, layers;
    None when every layer is dense."""
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    if first_dense >= hf["num_hidden_layers"]:
        return None
    for key, expected in _DEEPSEEK_ROUTER[arch]:
        if key in hf and hf[key] != expected:
            raise UnsupportedModelError(f"{where}: {key}={hf[key]!r} is not supported ({expected!r})")
    shared = int(hf.get("n_shared_experts") or 0)
    routing = _v3_routing(hf, where) if arch == "deepseek_v3" else _v2_routing(hf, where)
    return MoEConfig(
        num_experts=hf["n_routed_experts"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        router_topk=hf["num_experts_per_tok"],
        shared_expert_ffn_hidden_size=hf["moe_intermediate_size"] * shared if shared else None,
        topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        first_k_dense=first_dense,
        **routing,
    )


def _v3_routing(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
    """DeepSeek-V3: sigmoid scores with an expert bias (aux-loss-free balancing), the top k of the best
    groups, renormalised."""
    groups, best, topk = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1), hf["num_experts_per_tok"]
    if topk == 1:  # DeepSeek renormalises one weight to 1; megatron-core renormalises only top-k > 1
        raise UnsupportedModelError(f"{where}: num_experts_per_tok=1 is not supported (megatron keeps the sigmoid "
                                    "score of a single expert, DeepSeek-V3 renormalises it to 1)")
    if best < groups and topk // best != 2:
        # DeepSeek ranks groups by their two best experts' scores; megatron-core by the top topk / topk_group
        raise UnsupportedModelError(f"{where}: num_experts_per_tok={topk} with topk_group={best} of n_group={groups} "
                                    "is not supported (megatron ranks groups by their top num_experts_per_tok / "
                                    "topk_group experts, DeepSeek by their top 2)")
    return dict(score_function="sigmoid", expert_bias=True, num_groups=hf.get("n_group"),
                group_topk=hf.get("topk_group"))


def _v2_routing(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
    """DeepSeek-V2: softmax over all experts, the top k taken without renormalising; `greedy` over all
    experts (V2-Lite) or `group_limited_greedy` over the best topk_group groups."""
    method, topk = hf["topk_method"], hf["num_experts_per_tok"]
    groups = best = None
    if method == "group_limited_greedy":
        groups, best = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        if best < groups and topk // best != 1:
            # DeepSeek-V2 ranks groups by their best expert's score; megatron-core by the top topk / topk_group
            raise UnsupportedModelError(f"{where}: topk_method='group_limited_greedy' with num_experts_per_tok={topk} "
                                        f"and topk_group={best} is not supported (megatron ranks groups by their top "
                                        "num_experts_per_tok / topk_group experts, DeepSeek-V2 by its best one)")
    elif method != "greedy":
        raise UnsupportedModelError(f"{where}: topk_method={method!r} is not supported for DeepSeek-V2 "
                                    "(greedy, group_limited_greedy)")
    limited = groups is not None and best < groups
    return dict(score_function="softmax", pre_softmax=True, num_groups=groups if limited else None,
                group_topk=best if limited else None)


def _qwen3_moe(hf: Dict[str, Any], where: str) -> MoEConfig:
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(f"{where}: dense layers inside Qwen3-MoE (mlp_only_layers, "
                                    f"decoder_sparse_step) are not supported")
    return MoEConfig(
        num_experts=hf.get("num_experts") or hf["num_local_experts"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        router_topk=hf["num_experts_per_tok"],
        score_function="softmax",
        # norm_topk_prob: softmax over the top-k logits == renormalised top-k probabilities.
        pre_softmax=not hf.get("norm_topk_prob", False),
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
    )


def hf_config_from_model(cfg: ModelConfig, carried_layers: int = 0) -> Dict[str, Any]:
    """config.json content for exporting `cfg` in HF format: its multi-token-prediction layers (model.mtp)
    and `carried_layers` more carried past them (DeepSeek-V3) count in num_nextn_predict_layers."""
    if cfg.arch not in HF_ARCH:
        raise UnsupportedModelError(f"model.arch={cfg.arch} has no HF export (supported: {sorted(HF_ARCH)})")
    if cfg.mtp is not None and cfg.arch != "deepseek_v3":
        raise UnsupportedModelError(f"model.mtp: multi-token-prediction layers have an HF layout in deepseek_v3 "
                                    f"checkpoints only, not model.arch={cfg.arch}")
    mtp_layers = (cfg.mtp.num_layers if cfg.mtp is not None else 0) + carried_layers
    hf: Dict[str, Any] = {
        "architectures": [HF_ARCH[cfg.arch]],
        "model_type": MODEL_TYPE[cfg.arch],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": {v: k for k, v in _DTYPES.items()}[cfg.dtype],
    }
    if cfg.arch == "llama":
        hf["attention_bias"] = cfg.add_qkv_bias
        if cfg.rope_scaling_factor is not None:
            hf["rope_scaling"] = {
                "rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            }
    if cfg.arch == "qwen3":
        hf["attention_bias"] = cfg.add_qkv_bias
    if cfg.arch == "qwen3_moe":
        e = cfg.moe
        hf.update(
            num_experts=e.num_experts, num_local_experts=e.num_experts,
            moe_intermediate_size=e.ffn_hidden_size, num_experts_per_tok=e.router_topk,
            norm_topk_prob=not e.pre_softmax, decoder_sparse_step=1, mlp_only_layers=[],
            router_aux_loss_coef=e.aux_loss_coeff, attention_bias=cfg.add_qkv_bias,
        )
    if cfg.arch in DEEPSEEK:
        hf.update(_deepseek_entries(cfg, mtp_layers))
        del hf["head_dim"]
    return hf


def _deepseek_entries(cfg: ModelConfig, mtp_layers: int) -> Dict[str, Any]:
    m, e = cfg.mla, cfg.moe
    if m is None:
        raise UnsupportedModelError(f"model.arch={cfg.arch} without model.mla has no HF export")
    out: Dict[str, Any] = {
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_head_dim,
        "qk_rope_head_dim": m.qk_pos_emb_head_dim, "v_head_dim": m.v_head_dim, "attention_bias": False,
    }
    if cfg.arch == "deepseek_v3":
        out.update(rope_interleave=True, num_nextn_predict_layers=mtp_layers)
    if m.yarn is not None:
        y = m.yarn
        out["rope_scaling"] = {"rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast,
                               "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                               "original_max_position_embeddings": y.original_max_position_embeddings}
    if e is None:
        out["first_k_dense_replace"] = cfg.num_layers
        return out
    _check_deepseek_routing(cfg)
    shared = (e.shared_expert_ffn_hidden_size or 0) // e.ffn_hidden_size
    out.update(n_routed_experts=e.num_experts, moe_intermediate_size=e.ffn_hidden_size,
               num_experts_per_tok=e.router_topk, n_shared_experts=shared,
               routed_scaling_factor=e.topk_scaling_factor or 1.0, n_group=e.num_groups or 1,
               topk_group=e.group_topk or 1, first_k_dense_replace=e.first_k_dense)
    if cfg.arch == "deepseek_v3":
        out.update(norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc")
    else:
        out.update(norm_topk_prob=False, scoring_func="softmax",
                   topk_method="group_limited_greedy" if e.num_groups else "greedy")
    return out


def _check_deepseek_routing(cfg: ModelConfig) -> None:
    """Refuse an export whose routing the HF family's router would not reproduce."""
    e = cfg.moe
    if bool(e.num_groups) != bool(e.group_topk):  # megatron limits groups only with both set; HF always would
        raise UnsupportedModelError(f"model.moe of {cfg.name}: num_groups={e.num_groups} with group_topk="
                                    f"{e.group_topk}: set both (group-limited routing) or neither for an HF export")
    if cfg.arch == "deepseek_v3":
        ok, rule = e.score_function == "sigmoid" and e.expert_bias and e.router_topk > 1, \
            "score_function=sigmoid, expert_bias=true, router_topk > 1"
        if ok and e.num_groups and e.group_topk and e.group_topk < e.num_groups:
            ok = e.router_topk // e.group_topk == 2
            rule += ", router_topk / group_topk == 2"
    else:
        ok, rule = e.score_function == "softmax" and e.pre_softmax and not e.expert_bias, \
            "score_function=softmax, pre_softmax=true, expert_bias=false"
        if ok and e.num_groups and e.group_topk and e.group_topk < e.num_groups:
            ok = e.router_topk // e.group_topk == 1
            rule += ", router_topk / group_topk == 1"
    if not ok:
        raise UnsupportedModelError(f"model.moe of {cfg.name} routes otherwise than {HF_ARCH[cfg.arch]} "
                                    f"(exportable: {rule})")


def transformers_config(cfg: ModelConfig, **overrides: Any):
    """transformers' config object for `cfg`, to build its HF model class in memory."""
    from transformers import AutoConfig

    hf = {k: v for k, v in hf_config_from_model(cfg).items() if k not in ("architectures", "torch_dtype")}
    return AutoConfig.for_model(hf.pop("model_type"), **hf, **overrides)
