"""Structured config: one dataclass per Hydra group, registered in the ConfigStore.

Every default is declared here, once: the conf/ presets hold only what differs from it, and
the default run's own settings are in conf/config.yaml. Hydra merges the presets onto these
schemas, so a misspelled key or a value of the wrong type is refused while the config is
composed, before any process group starts; a key that takes one of a fixed set is
`Annotated[str, <Literal>]` (the sets are in r1mega.config.choices) and a value outside it is
refused as the config is loaded. Cross-field rules live in r1mega.config.validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from r1mega.config.bench_schema import BenchConfig
from r1mega.config.choices import (AdvantageMode, AggregationMode, Arch, AttentionBackend, CodeLanguage, CodeSandbox,
                                   Corpus, CorrectionLevel, DataName, DecayStyle, Dtype, Engine, FP8Format, FP8Recipe,
                                   KLEstimator, Launcher, LoadBalancing, OnBadRow, OptimizerName, PartialKV,
                                   PromptTemplate, RatioLevel, RolloutMode, RoutingReplay, ScoreFunction, SFTTemplate,
                                   StageKind, StaleSamples, StdConvention, TokenDispatcher, WarningSignal,
                                   WorkerFailure)
from r1mega.config.sglang_schema import SGLangConfig


@dataclass
class MoEConfig:
    num_experts: int = MISSING
    ffn_hidden_size: int = MISSING  # per routed expert
    router_topk: int = 2
    shared_expert_ffn_hidden_size: Optional[int] = None  # summed over shared experts
    shared_expert_gate: bool = False
    score_function: Annotated[str, ScoreFunction] = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False  # softmax over all experts before top-k (else over the top-k)
    expert_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3)
    # each optimizer step moves every expert's bias by this toward balance (+ when under-loaded, - when over;
    # DeepSeek-V3's gamma); 0 freezes the bias
    expert_bias_update_rate: float = 1e-3
    topk_scaling_factor: Optional[float] = None
    num_groups: Optional[int] = None  # node-limited routing (DeepSeek-V3)
    group_topk: Optional[int] = None
    aux_loss_coeff: float = 0.0
    # aux_loss | seq_aux_loss (DeepSeek's: per row, a THD pack's rows too) | global_aux_loss | sinkhorn | none
    load_balancing_type: Annotated[str, LoadBalancing] = "aux_loss"  # megatron's moe_router_load_balancing_type
    z_loss_coeff: Optional[float] = None
    first_k_dense: int = 0  # leading dense layers before MoE layers start
    dense_ffn_hidden_size: Optional[int] = None  # FFN width of those dense layers
    grouped_gemm: bool = True  # used where the backend has it (TE); local spec loops
    token_dispatcher: Annotated[str, TokenDispatcher] = "alltoall"  # allgather | alltoall
    router_dtype: Optional[str] = "fp32"


@dataclass
class YarnConfig:
    """YaRN rotary scaling, DeepSeek-V3's (HF rope_scaling type yarn), as megatron's MLA implements it."""

    factor: float = MISSING
    original_max_position_embeddings: int = MISSING
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class MLAConfig:
    """Multi-latent attention (DeepSeek-V2/V3); sizes default to DeepSeek-V3's."""

    q_lora_rank: Optional[int] = None  # None: queries project directly (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # the part of each query/key head without rotary embedding
    qk_pos_emb_head_dim: int = 64  # the rotary part
    v_head_dim: int = 128
    yarn: Optional[YarnConfig] = None  # None: plain rotary embedding


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): megatron-core's MTP block after the decoder. Each layer
    predicts one token further ahead from the previous depth's hidden state and the next token's
    embedding, sharing the embedding and output layer. Training adds its cross-entropy, scaled by
    loss_scale / num_layers; in RL steps the decoder, embedding and head are detached from it, so only
    the MTP layers learn from the samples (the global grad-norm clip still counts their gradients).
    Generation never runs it."""

    num_layers: int = 1
    loss_scale: float = 0.1  # megatron's mtp_loss_scaling_factor (DeepSeek-V3: 0.3 early, 0.1 later)


@dataclass
class FP8Config:
    format: Optional[Annotated[str, FP8Format]] = None  # None (off) | hybrid | e4m3
    recipe: Annotated[str, FP8Recipe] = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    param: bool = False  # keep parameters in fp8
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: Annotated[str, Arch] = "qwen2"  # qwen2 | qwen3 | llama | qwen3_moe | deepseek_v2 | deepseek_v3 (HF family)
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
    dtype: Annotated[str, Dtype] = "fp32"  # fp32 | bf16 | fp16
    attention_backend: Annotated[str, AttentionBackend] = "auto"  # auto | te | flash | sdpa
    moe: Optional[MoEConfig] = None
    mla: Optional[MLAConfig] = None
    # None: no MTP layers; an HF checkpoint's (layers numbered num_layers and up) are carried unchanged
    mtp: Optional[MTPConfig] = None
    fp8: FP8Config = field(default_factory=FP8Config)
    hf_path: Optional[str] = None  # local HF checkpoint to load (r1mega-convert or training)
    mcore_path: Optional[str] = None  # r1mega model checkpoint (megatron dist format) to start from


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1  # context parallel: the RL trainer's packs split over cp ranks (megatron's two-chunk layout)
    etp: Optional[int] = None  # expert tensor parallel; default = tp
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    pipeline_layout: Optional[List[int]] = None  # layers per stage, when pp does not divide
    nproc: Optional[int] = None  # ranks to spawn here when not launched by torchrun/Slurm
    timeout_minutes: int = 30


@dataclass
class OptimizerConfig:
    """An optimizer and its learning-rate schedule. The RL policy's (`optimizer`) is these defaults with
    a 5-step warm-up (R1Config); the built-in base model's (`pretrain.optimizer`) is set in PretrainConfig."""

    name: Annotated[str, OptimizerName] = "adam"  # adam | sgd
    lr: float = 5e-5  # the tiny built-in model's; R1-Zero uses 3e-6 for large models
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Annotated[str, DecayStyle] = "constant"  # constant | linear | cosine
    decay_steps: Optional[int] = None  # default trainer.steps
    distributed: bool = True  # shard optimizer states over data-parallel ranks


@dataclass
class RowLimits:
    """How large a data row may be: larger ones are bad rows (on_bad_row), named by file and line,
    before they are parsed whole."""

    max_row_bytes: int = 16 << 20  # a JSONL line or a Parquet row as stored
    max_field_chars: int = 1 << 20  # a prompt, an answer, a message's content


@dataclass
class DataConfig:
    """Prompts for RL: a built-in generated task or JSONL/Parquet files."""

    name: Annotated[str, DataName] = "arithmetic"  # arithmetic | countdown | code (built in, generated) | files
    train_path: Optional[str] = None  # JSONL/Parquet for name=files
    test_path: Optional[str] = None  # held-out prompts for evaluation (optional for files)
    # r1_zero | chat (the tokenizer's chat template) | plain
    template: Annotated[str, PromptTemplate] = "r1_zero"
    tokenizer: Optional[str] = None  # local HF tokenizer folder; default model.hf_path, else built-in
    on_bad_row: Annotated[str, OnBadRow] = "skip"  # skip (warn, with file and line) | error
    limits: RowLimits = field(default_factory=RowLimits)
    train_size: int = 20000  # generated tasks: problems in the train split
    test_size: int = 200  # generated tasks: problems in the held-out split
    difficulty: Dict[str, Any] = field(default_factory=dict)  # task knobs, e.g. {digits: 3}
    prompts_per_step: int = 16  # prompts per RL step over all data-parallel ranks
    max_prompt_tokens: int = 256  # longer prompts are skipped with a warning
    seed: int = 1234


@dataclass
class PretrainConfig:
    """Language-model pre-training: the built-in base model for the default run, or the LM loop."""

    enabled: bool = True  # build the base model when neither model.hf_path nor model.mcore_path is set
    # task (documents of the built-in task) | synthetic (rule sequences)
    corpus: Annotated[str, Corpus] = "task"
    correct_fraction: float = 0.3  # task corpus: share of worked answers that are right
    documents: int = 20000  # task corpus size
    steps: int = 600
    seq_length: int = 128
    micro_batch_size: int = 16
    global_batch_size: int = 32
    seed: int = 1234
    cache_dir: str = "outputs/base-models"  # built base models, one folder per config hash
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=3e-3, min_lr=3e-4, weight_decay=0.01, warmup_steps=20, decay_style="cosine"))


@dataclass
class CorrectionConfig:
    """Off-policy corrections of the policy-gradient term from rho = pi_prox / pi_rollout, the trainer's
    log-probs before the update over the engine's (r1mega.algorithms.off_policy; presets in conf/correction).
    `weight`: the importance weight's level, truncated at weight_cap (TIS: token, 2). `reject`: weight 0
    where rho at that level leaves [reject_low, reject_high] (MIS, IcePop)."""

    weight: Optional[Annotated[str, CorrectionLevel]] = None  # None | token | sequence | geometric
    weight_cap: Optional[float] = None
    reject: Optional[Annotated[str, CorrectionLevel]] = None  # None | token | sequence | geometric
    reject_low: Optional[float] = None
    reject_high: Optional[float] = None
    veto: Optional[float] = None  # a response with a token of rho below this is rejected whole


@dataclass
class TeacherConfig:
    """The teacher of on-policy distillation: a frozen model in the job that scores every token the
    student samples. It may be larger than the student and have its own parallel layout over the same
    ranks; it must share the student's tokenizer (refused before any process starts otherwise)."""

    path: Optional[str] = None  # an r1mega model folder (a stage's model/, with model.yaml) or an HF checkpoint
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # its tp, pp, ep, etp (cp 1; nproc unused)
    micro_batch_tokens: Optional[int] = None  # tokens of one teacher forward; default trainer.micro_batch_tokens
    # http://host:port of an SGLang server serving the teacher (GPU): it returns the prompt log-probs of the
    # student's tokens instead of a model in the job; `path` then names the folder it serves (tokenizer check)
    server: Optional[str] = None


@dataclass
class OPDConfig:
    """On-policy distillation (algorithm=opd): every sampled token's advantage is the teacher's log-prob
    minus the student's, -(log pi_student(t) - log pi_teacher(t)), the per-token reverse KL (GKD with
    lambda = 1), optionally plus the task reward's group advantage (r1mega.algorithms.distill)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    kl_coef: float = 1.0  # weight of the reverse-KL advantage
    kl_clip: Optional[float] = None  # each token's log-ratio clipped to [-kl_clip, kl_clip] in the advantage
    reward_weight: float = 0.0  # weight of the task reward's group advantage added to every token's
    # 0: the reverse KL on the sampled tokens (as advantages); k: instead, a loss term of its own, the reverse KL
    # of the full-vocabulary distributions coarsened onto the teacher's k most likely tokens and the rest
    top_k: int = 0


@dataclass
class AlgorithmConfig:
    """GRPO and its refinements; see r1mega/algorithms for the formulas."""

    name: str = "grpo"  # a label: the preset's name (conf/algorithm)
    group_size: int = 8  # responses per prompt
    advantage: Annotated[str, AdvantageMode] = "grpo"  # grpo | drgrpo | rloo | batch_std
    std: Annotated[str, StdConvention] = "sample"  # sample (n-1) | population (n)
    adv_eps: float = 1e-6
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low: DAPO clip-higher
    dual_clip: Optional[float] = None  # c > 1 caps the loss of negative advantages at -c*A
    ratio_level: Annotated[str, RatioLevel] = "token"  # token | sequence (GSPO)
    kl_beta: float = 0.001  # 0 loads no reference model
    kl_estimator: Annotated[str, KLEstimator] = "k3"  # k1 | k2 | k3
    ref_reset_every: int = 0  # reset the reference to the policy every N steps (R1: 400); 0 = never
    entropy_coeff: float = 0.0  # entropy bonus weight
    # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_agg: Annotated[str, AggregationMode] = "seq-mean-token-mean"
    norm_length: Optional[int] = None  # seq-mean-token-sum-norm constant; default rollout.max_new_tokens
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer steps per RL step, each over a share of the rollouts
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, generate more
    max_extra_rounds: int = 3  # cap on dynamic-sampling generation rounds per step
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # off by default
    # rollout.mode=async: policy versions (RL steps) a sample may lag the policy it trains; 0 = on-policy
    max_staleness: int = 0
    stale_samples: Annotated[str, StaleSamples] = "drop"  # drop | regenerate (its prompts go out again)
    use_rollout_logprobs: bool = False  # take the engine's log-probs as the old policy (no recompute)
    # MoE: the routers of the log-prob passes and the update take the experts the rollout engine chose
    # (rollout: R3), or those of the old policy's log-prob pass (old: R2); none routes afresh
    routing_replay: Annotated[str, RoutingReplay] = "none"
    opd: Optional[OPDConfig] = None  # on-policy distillation from a teacher (algorithm=opd); None: off


@dataclass
class AsyncRolloutConfig:
    """rollout.mode=async: native-engine rollout workers, each a process with a world of its own, generate
    and score groups into a queue while the trainer trains; weights reach them over a bridge group
    (r1mega/rollout/worker.py, r1mega/trainer/rl/async_rollout.py)."""

    workers: int = 1  # rollout worker processes beside the trainer's ranks (on the trainer's first host)
    prompts_per_request: int = 0  # prompts one worker generates in one call; 0 = a step's (data.prompts_per_step)
    weight_sync_every: int = 1  # weights go to the workers every k steps; k <= algorithm.max_staleness + 1
    partial: bool = False  # weights land between decode steps: unfinished samples go on under the new ones
    # keep (the cache of the tokens so far as the old weights computed it) | recompute (under the new ones)
    partial_kv: Annotated[str, PartialKV] = "keep"
    worker_timeout_s: float = 600.0  # a worker that shows no sign of life this long counts as hung (and is killed)
    # stop (the run saves a checkpoint and stops) | continue (its requests go to the others; the run stops when
    # none is left): what a lost worker (exited, raised, hung) does to the run
    on_worker_failure: Annotated[str, WorkerFailure] = "stop"


@dataclass
class RolloutConfig:
    engine: Annotated[str, Engine] = "native"  # native (the trainer's megatron model) | sglang
    mode: Annotated[str, RolloutMode] = "sync"  # sync (generate, then train) | async (rollout.asynchronous)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: List[str] = field(default_factory=list)  # stop strings besides EOS
    max_batch_size: int = 512  # rows decoded together by the native engine
    eval_temperature: float = 0.0  # 0: greedy pass@1
    eval_samples: int = 4  # k of sampled pass@k at `temperature`; 0 = off
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # used when engine=sglang
    asynchronous: AsyncRolloutConfig = field(default_factory=AsyncRolloutConfig)  # used when mode=async


@dataclass
class CodeRewardConfig:
    """Accuracy of code rows (rows whose metadata has `tests`): the response's program run against the
    tests, each run in a bubblewrap sandbox (r1mega.rewards.code, r1mega.rewards.sandbox)."""

    sandbox: Annotated[str, CodeSandbox] = "bwrap"  # bwrap | none (no isolation: a warning every step)
    bwrap: Optional[str] = None  # the bwrap executable; default bwrap on PATH
    language: Annotated[str, CodeLanguage] = "python"  # python | cpp
    all_or_nothing: bool = True  # 1 only when every test passes; false: the fraction passed
    test_timeout_s: float = 5.0  # wall time of one test (a compile gets three times this)
    budget_s: float = 20.0  # wall time of one sample's tests together; tests left over fail
    workers: int = 1  # sandboxes one sample's tests use at once, each a slot of its own (reward workers add more)
    cpu_s: int = 5  # RLIMIT_CPU of every process of a program
    memory_mb: int = 1024  # RLIMIT_AS
    processes: int = 64  # RLIMIT_NPROC of the slot
    file_size_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout and stderr kept each; more fails the test
    work_mb: int = 64  # the tmpfs home and working directory of a sandbox


@dataclass
class RewardConfig:
    components: Dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})  # RewardName -> weight
    custom: Dict[str, Any] = field(default_factory=dict)  # name -> {_target_: fn, weight: w, ...}
    timeout_s: float = 5.0  # per sample
    num_workers: int = 2  # scoring processes; 0 scores in the trainer's process, without a hard deadline: tests only
    language: str = "en"  # target language of the language-consistency reward
    overlong_max_tokens: Optional[int] = None  # DAPO soft overlong punishment; default max_new_tokens
    overlong_cache_tokens: int = 0
    code: Optional[CodeRewardConfig] = None  # on (reward=code): code rows are scored by running their programs


@dataclass
class TrainerConfig:
    steps: int = 20
    seed: int = 1234
    output_dir: str = "outputs/${model.name}-${now:%Y%m%d-%H%M%S}"
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end
    save_at_end: bool = True
    export_hf: bool = False  # a finished run also writes <output_dir>/hf: a complete HF folder
    load: Optional[str] = None  # checkpoint dir to resume from; "auto" = latest in output_dir
    eval_every: int = 0  # evaluate on the held-out split every N steps (and before/after); 0 = ends only
    eval_at_ends: bool = True  # evaluate before the first and after the last step
    micro_batch_tokens: int = 8192  # tokens of one training micro-batch (a pack, or padded rows x length) per CP rank
    pack: bool = True  # THD packs of RL rows, balanced in tokens over micro-batches and data-parallel ranks
    tensorboard: bool = True
    plot: bool = True  # PNG of reward, accuracy and length curves at the end
    progress: bool = True  # progress bar on rank 0


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations: cold start, rejection-sampled data, distillation."""

    train_files: List[str] = field(default_factory=list)  # JSONL/Parquet rows with `messages`; mixed
    valid_files: List[str] = field(default_factory=list)  # held-out conversations for the eval loss
    # chat (the tokenizer's chat template) | r1_zero (the user turn in R1-Zero's template)
    template: Annotated[str, SFTTemplate] = "chat"
    on_bad_row: Annotated[str, OnBadRow] = "skip"  # skip (warn, with file and line) | error
    limits: RowLimits = field(default_factory=RowLimits)
    max_seq_length: int = 1024  # longer conversations are skipped with a warning
    samples_per_step: int = 32  # conversations per optimizer step, over all data-parallel ranks
    pack: bool = True  # THD packing: whole samples back to back, attention kept inside each
    micro_batch_tokens: int = 4096  # tokens of one micro-batch (a pack, or padded rows x length)
    epochs: int = 1
    steps: int = 0  # optimizer steps; 0 = as many as `epochs` passes take
    eval_every: int = 0  # eval loss on valid_files every N steps; 0 = at the end only
    seed: int = 1234


@dataclass
class SampleConfig:
    """Rejection sampling: k responses per prompt, filtered, up to m kept, written as SFT conversations."""

    samples_per_prompt: int = 8  # k
    keep_per_prompt: int = 2  # m
    max_prompts: int = 0  # prompts of the train split to sample from; 0 = all
    min_accuracy: float = 1.0  # correct: accuracy reward at least this
    min_format: float = 1.0  # well-formed: format reward at least this
    min_language: float = 0.95  # no language mixing: language-consistency share at least this
    max_response_tokens: Optional[int] = None  # length cap; default rollout.max_new_tokens
    dedupe: bool = True  # drop repeated responses to the same prompt (whitespace-normalised)
    mix_files: List[str] = field(default_factory=list)  # non-reasoning conversations added as they are
    prompts_per_call: int = 64  # prompts per generation call; each call's results are kept for resuming
    seed: int = 1234


@dataclass
class ColdStartConfig:
    """Built-in conversations of the miniature pipeline: readable worked traces and non-reasoning turns."""

    traces: int = 2000  # correct worked solutions of the built-in task's train split
    general: int = 400  # non-reasoning conversations (answers without a reasoning block)
    seed: int = 4321


@dataclass
class StageConfig:
    name: str = MISSING  # also the stage's folder under pipeline.output_dir
    kind: Annotated[str, StageKind] = MISSING  # cold_start_data | eval | sft | rl | opd | sample
    overrides: List[str] = field(default_factory=list)  # `{stage}`: that stage's folder; `{var}`: pipeline.vars
    evaluate: bool = False  # held-out accuracy of the stage's model once it finishes


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/pipeline"
    vars: Dict[str, str] = field(default_factory=dict)  # `{name}` in stage overrides: paths the user gives
    common: List[str] = field(default_factory=list)  # overrides every stage gets first
    stages: List[StageConfig] = field(default_factory=list)
    launcher: List[str] = field(default_factory=list)  # replaces `python -m` before a stage's entry module


@dataclass
class ClusterConfig:
    """Where `r1mega-submit` (and `-m` sweeps through hydra/launcher=slurm) run a job: a Slurm site."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job on gloo
    ranks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_rank: Optional[int] = None  # CPU cores per rank (torchrun's one task per node gets ranks x this)
    mem: Optional[str] = None  # per node, as sbatch takes it ("0" = all of it, "200G")
    time: str = "01:00:00"  # [D-]HH:MM:SS or minutes
    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    # torchrun (one per node, c10d rendezvous) | srun (one task per rank)
    launcher: Annotated[str, Launcher] = "torchrun"
    container_image: Optional[str] = None  # pyxis/enroot sites: srun --container-image
    container_mounts: List[str] = field(default_factory=list)  # "src:dst" pairs
    network: Dict[str, str] = field(default_factory=dict)  # NCCL/fabric variables (cluster/network presets)
    env: Dict[str, str] = field(default_factory=dict)  # the site's own variables; win over `network`
    setup: List[str] = field(default_factory=list)  # shell lines before launch (module load, venv)
    python: Optional[str] = None  # interpreter on the compute nodes; default: the one r1mega-submit runs
    signal: Annotated[str, WarningSignal] = "USR1"  # sent before the time limit: checkpoint, then requeue
    signal_lead_s: int = 300  # how long before the limit (allow one step and a checkpoint)
    requeue: bool = True  # requeue after the time-limit checkpoint
    max_requeues: int = 20  # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
    log_dir: Optional[str] = None  # Slurm's output files; default <run>/slurm
    sbatch: Dict[str, Any] = field(default_factory=dict)  # more #SBATCH options: {constraint: h100}


@dataclass
class R1Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(warmup_steps=5))  # RL policy
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


_GROUPS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "pretrain": PretrainConfig,
    "algorithm": AlgorithmConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "sft": SFTConfig,
    "sample": SampleConfig,
    "cold_start": ColdStartConfig,
    "cluster": ClusterConfig,
    "bench": BenchConfig,
}


def register() -> None:
    """Register the root schema and one schema per group (used as `- schema@_here_`). The resolver of
    conf/hydra/launcher/slurm.yaml is registered where Hydra's launcher runs (r1mega.slurm.submitit)."""
    cs = ConfigStore.instance()
    cs.store(name="r1mega_schema", node=R1Config)
    for group, node in _GROUPS.items():
        cs.store(group=group, name="schema", node=node)
