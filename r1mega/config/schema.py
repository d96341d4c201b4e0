"""Structured config: one dataclass per Hydra group, registered in the ConfigStore.

Hydra merges conf/ YAML presets onto these schemas, so a misspelled key or a value of the
wrong type is refused while the config is composed, before any process group starts.
Cross-field rules live in r1mega.config.validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class MoEConfig:
    num_experts: int = MISSING
    ffn_hidden_size: int = MISSING  # per routed expert
    router_topk: int = 2
    shared_expert_ffn_hidden_size: Optional[int] = None  # summed over shared experts
    shared_expert_gate: bool = False
    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False  # softmax over all experts before top-k (else over the top-k)
    expert_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3)
    topk_scaling_factor: Optional[float] = None
    num_groups: Optional[int] = None  # node-limited routing (DeepSeek-V3)
    group_topk: Optional[int] = None
    aux_loss_coeff: float = 0.0
    load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    z_loss_coeff: Optional[float] = None
    first_k_dense: int = 0  # leading dense layers before MoE layers start
    dense_ffn_hidden_size: Optional[int] = None  # FFN width of those dense layers
    grouped_gemm: bool = True  # used where the backend has it (TE); local spec loops
    token_dispatcher: str = "alltoall"  # allgather | alltoall
    router_dtype: Optional[str] = "fp32"


@dataclass
class MLAConfig:
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class FP8Config:
    format: Optional[str] = None  # None (off) | hybrid | e4m3
    recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    param: bool = False  # keep parameters in fp8
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: str = "qwen2"  # qwen2 | qwen3 | llama | qwen3_moe | deepseek_v3 (HF family)
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # KV heads (GQA)
    head_dim: Optional[int] = None  # default hidden_size / num_attention_heads
    vocab_size: int = MISSING
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama 3.1 style; None = off
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = False  # Qwen3
    add_qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    attention_backend: str = "auto"  # auto | te | flash | sdpa
    moe: Optional[MoEConfig] = None
    mla: Optional[MLAConfig] = None
    fp8: FP8Config = field(default_factory=FP8Config)
    hf_path: Optional[str] = None  # local HF checkpoint to load (r1mega-convert or training)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallel; default = tp
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    pipeline_layout: Optional[List[int]] = None  # layers per stage, when pp does not divide
    nproc: Optional[int] = None  # ranks to spawn here when not launched by torchrun/Slurm
    timeout_minutes: int = 30


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: str = "constant"  # constant | linear | cosine
    decay_steps: Optional[int] = None  # default trainer.steps
    distributed: bool = True  # shard optimizer states over data-parallel ranks


@dataclass
class DataConfig:
    name: str = "synthetic"
    seq_length: int = 64
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    group_size: int = 8
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.001
    kl_estimator: str = "k3"


@dataclass
class RolloutConfig:
    engine: str = "native"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128


@dataclass
class RewardConfig:
    components: Dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    timeout_s: float = 5.0


@dataclass
class TrainerConfig:
    steps: int = 20
    seed: int = 1234
    output_dir: str = MISSING
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end
    save_at_end: bool = True
    load: Optional[str] = None  # checkpoint dir to resume from; "auto" = latest in output_dir


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class R1Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


_GROUPS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "algorithm": AlgorithmConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "cluster": ClusterConfig,
}


def register() -> None:
    """Register the root schema and one schema per group (used as `- schema@_here_`)."""
    cs = ConfigStore.instance()
    cs.store(name="r1mega_schema", node=R1Config)
    for group, node in _GROUPS.items():
        cs.store(group=group, name="schema", node=node)
