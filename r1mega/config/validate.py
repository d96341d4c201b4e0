"""Cross-field checks on a composed config, run before any process group starts.

Each failure names the keys involved and says what to change.
"""

from __future__ import annotations

from typing import Callable, Optional

from r1mega.config.choices import check_choices
from r1mega.config.cluster_rules import check_cluster
from r1mega.config.errors import ConfigError, require as _check  # noqa: F401
from r1mega.config.rl_rules import check_rl
from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, R1Config
from r1mega.config.stage_rules import check_stages


def validate(cfg: R1Config, world_size: Optional[int] = None,
             entry_rules: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Raise ConfigError on the first rule the config breaks; `entry_rules` are what one entry
    point needs besides the general rules (e.g. check_sft_run)."""
    check_choices(cfg)  # every key with a fixed set of values (a loaded config has passed this already)
    check_cluster(cfg.cluster)  # first: a submitted job's world size comes from it
    check_model(cfg.model)
    check_layout(cfg.model, cfg.parallel, world_size)
    check_fp8_shapes(cfg)
    check_optimizer(cfg.optimizer, "optimizer")
    check_optimizer(cfg.pretrain.optimizer, "pretrain.optimizer")
    check_rl(cfg, _data_parallel_size(cfg.parallel, world_size))
    check_stages(cfg, _data_parallel_size(cfg.parallel, world_size))
    if entry_rules is not None:
        entry_rules(cfg, world_size)


def check_installed(m: ModelConfig) -> None:
    """What the model config needs of this machine's packages. Run where the job runs, after
    `validate`: r1mega-submit checks on a login node, which may lack the GPUs and packages of
    the job's nodes."""
    from r1mega.platform import installed  # torch: loaded when a config is checked, not with r1mega.config

    if m.fp8.format is not None:
        _check(installed.transformer_engine(),
               f"model.fp8.format={m.fp8.format} needs Transformer Engine, which is not usable here (it needs a "
               f"CUDA GPU and transformer-engine[pytorch]: pip install 'r1mega[gpu]'); unset model.fp8.format "
               f"to train in {m.dtype}")
    for backend, usable, package in (("te", installed.transformer_engine, "transformer-engine[pytorch]"),
                                     ("flash", installed.flash_attn, "flash-attn")):
        if m.attention_backend == backend:
            _check(usable(), f"model.attention_backend={backend} needs {package} on a CUDA GPU, which is not "
                             f"usable here; use model.attention_backend=auto")


def _data_parallel_size(p: ParallelConfig, world_size: Optional[int]) -> Optional[int]:
    return None if world_size is None else world_size // (p.tp * p.pp * p.cp)


def check_model(m: ModelConfig) -> None:
    """Rules of the model config alone (also of one read from a checkpoint)."""
    check_choices(m, "model.")
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size"):
        _check(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _check(
        m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_attention_heads={m.num_attention_heads} must be a multiple of "
        f"model.num_query_groups={m.num_query_groups}",
    )
    if m.head_dim is None:
        _check(
            m.hidden_size % m.num_attention_heads == 0,
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; set model.head_dim",
        )
    if m.moe is not None:
        e = m.moe
        _check(1 <= e.router_topk <= e.num_experts,
               f"model.moe.router_topk={e.router_topk} must be in [1, model.moe.num_experts={e.num_experts}]")
        _check(0 <= e.first_k_dense < m.num_layers,
               f"model.moe.first_k_dense={e.first_k_dense} must be below model.num_layers={m.num_layers}")
    if m.mtp is not None:
        _check(m.mtp.num_layers >= 1,
               f"model.mtp.num_layers={m.mtp.num_layers} must be >= 1 (model.mtp=null for none)")
        _check(m.mtp.loss_scale >= 0, f"model.mtp.loss_scale={m.mtp.loss_scale} must be >= 0")
    _check(not m.fp8.param or m.fp8.format is not None, "model.fp8.param=true needs model.fp8.format (e4m3 or hybrid)")
    if m.fp8.format is not None:
        _check(m.dtype == "bf16", "model.fp8.format needs model.dtype=bf16")


def check_layout(m: ModelConfig, p: ParallelConfig, world_size: Optional[int] = None) -> None:
    """Does the parallel layout fit the model (and the world size, when known)?"""
    for key in ("tp", "pp", "ep", "cp"):
        _check(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _check(
        m.num_attention_heads % p.tp == 0,
        f"parallel.tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}",
    )
    _check(m.vocab_size % p.tp == 0,
           f"parallel.tp={p.tp} must divide model.vocab_size={m.vocab_size} (vocab-parallel embedding)")
    _check(
        m.num_query_groups % p.tp == 0,
        f"parallel.tp={p.tp} must divide model.num_query_groups={m.num_query_groups} (KV heads); "
        f"use a tp that divides both head counts",
    )
    if p.ep > 1:
        _check(m.moe is not None, f"parallel.ep={p.ep} needs an MoE model (model.moe is unset)")
    if m.moe is not None:
        _check(
            m.moe.num_experts % p.ep == 0,
            f"parallel.ep={p.ep} must divide model.moe.num_experts={m.moe.num_experts}",
        )
    if m.moe is not None and p.tp > 1:
        _check(p.sequence_parallel, "an MoE model with parallel.tp > 1 needs parallel.sequence_parallel=true "
               "(megatron's MoE layer requires it under tensor parallelism)")
    if m.mla is not None and p.tp > 1:
        # without it megatron's MLA leaves each rank the gradient of the rotary key from its own heads only
        _check(p.sequence_parallel, "multi-latent attention (model.mla) with parallel.tp > 1 needs "
               "parallel.sequence_parallel=true (megatron's MLA sums the rotary key's gradient over the TP ranks "
               "only then)")
    if p.pipeline_layout is not None:
        _check(len(p.pipeline_layout) == p.pp,
               f"parallel.pipeline_layout has {len(p.pipeline_layout)} stages but parallel.pp={p.pp}")
        _check(sum(p.pipeline_layout) == m.num_layers,
               f"parallel.pipeline_layout sums to {sum(p.pipeline_layout)} layers, "
               f"model.num_layers={m.num_layers}")
    else:
        _check(
            m.num_layers % p.pp == 0,
            f"parallel.pp={p.pp} must divide model.num_layers={m.num_layers}, "
            f"or give parallel.pipeline_layout (layers per stage)",
        )
    _check(p.sequence_parallel is False or p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
    if p.cp > 1:
        _check(m.attention_backend in ("auto", "te", "sdpa"),
               "parallel.cp > 1 runs on the te or sdpa attention backend, not flash")
        # SDPA's context parallelism gathers keys and values as one tensor, of one head dim
        _check(m.mla is None or m.attention_backend in ("auto", "te"),
               "model.mla (multi-latent attention) with parallel.cp > 1 runs on the te attention backend only")
    if m.mtp is not None:
        # the MTP layers shift each row's tokens by one; megatron does it across context-parallel ranks in
        # its own split of a pack, and r1mega has not checked it against one rank there or with virtual stages
        _check(p.cp == 1, "model.mtp (multi-token prediction) with parallel.cp > 1 is not supported")
        _check(p.vpp is None, "model.mtp (multi-token prediction) with parallel.vpp is not supported")
    model_parallel = p.tp * p.pp * p.cp
    if world_size is not None:
        _check(
            world_size % model_parallel == 0,
            f"world size {world_size} must equal parallel.tp x pp x cp x dp = {p.tp} x {p.pp} x "
            f"{p.cp} x dp: {world_size} is not a multiple of {model_parallel}",
        )
        etp = p.etp or p.tp
        _check(
            world_size % (etp * p.ep * p.pp) == 0,
            f"world size {world_size} is not a multiple of parallel.etp x ep x pp = "
            f"{etp} x {p.ep} x {p.pp}",
        )


def check_fp8_shapes(cfg: R1Config) -> None:
    """With FP8, Transformer Engine refuses a linear layer whose input features (per rank) are not a
    multiple of 16 (MXFP8: 32) or whose output features are not a multiple of 8 (MXFP8: 32).
    Token counts r1mega pads itself, except the base model's pre-training sequences."""
    m, p = cfg.model, cfg.parallel
    if m.fp8.format is None:
        return
    from r1mega.platform.fp8 import feature_multiples, sequence_multiple  # megatron-core

    features, outputs = feature_multiples(m.fp8)
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    # (what, size per rank, multiple it needs)
    sizes = [("model.hidden_size", m.hidden_size, features)]
    e = m.moe
    if e is None:
        sizes.append(("model.ffn_hidden_size / parallel.tp", m.ffn_hidden_size // p.tp, features))
    else:  # megatron pads the experts' tokens for FP8, not their widths
        sizes.append(("model.moe.ffn_hidden_size / parallel.etp", e.ffn_hidden_size // (p.etp or p.tp), features))
        if e.first_k_dense:
            dense = e.dense_ffn_hidden_size or m.ffn_hidden_size
            sizes.append(("model.moe.dense_ffn_hidden_size / parallel.tp", dense // p.tp, features))
        if e.shared_expert_ffn_hidden_size:
            sizes.append(("model.moe.shared_expert_ffn_hidden_size / parallel.tp",
                          e.shared_expert_ffn_hidden_size // p.tp, features))
    if m.mla is None:
        sizes += [("model.num_attention_heads x head_dim / parallel.tp", m.num_attention_heads * head_dim // p.tp,
                   features),
                  ("(model.num_attention_heads + 2 x model.num_query_groups) x head_dim / parallel.tp",
                   (m.num_attention_heads + 2 * m.num_query_groups) * head_dim // p.tp, outputs)]
    for what, size, multiple in sizes:
        _check(size % multiple == 0, f"model.fp8.format={m.fp8.format}: Transformer Engine's FP8 linear layers need "
                                     f"{what} = {size} to be a multiple of {multiple} (recipe {m.fp8.recipe})")
    if cfg.pretrain.enabled and not (m.hf_path or m.mcore_path):  # the built-in base model is pre-trained first
        need = sequence_multiple(m.fp8, p)
        _check(cfg.pretrain.seq_length % need == 0,
               f"pretrain.seq_length={cfg.pretrain.seq_length} must be a multiple of {need} with model.fp8.format set "
               f"(Transformer Engine's FP8 token rule)")


def check_optimizer(o: OptimizerConfig, key: str) -> None:
    _check(o.name == "adam" or not o.distributed,
           f"{key}.name=sgd needs {key}.distributed=false (megatron's distributed optimizer is Adam only)")
    _check(o.lr > 0, f"{key}.lr must be positive, got {o.lr}")
    _check(o.min_lr <= o.lr, f"{key}.min_lr={o.min_lr} exceeds {key}.lr={o.lr}")
