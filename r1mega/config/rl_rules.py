"""Cross-field rules for the RL run: prompts, warm-up, algorithm, rollout, rewards, trainer."""

from __future__ import annotations

from typing import Optional, get_args

from r1mega.config.choices import RewardName
from r1mega.config.errors import require
from r1mega.config.schema import CorrectionConfig, R1Config

# Keys with a fixed set of values (data.name, algorithm.advantage, ...) were checked against it as the
# config was loaded (r1mega.config.choices); the rules below hold between keys.
BUILTIN_REWARDS = get_args(RewardName)


def check_rl(cfg: R1Config, dp: Optional[int]) -> None:
    """Raise ConfigError on the first RL rule the config breaks (dp None: world size unknown)."""
    _check_data(cfg, dp)
    _check_pretrain(cfg, dp)
    _check_algorithm(cfg, dp)
    _check_rollout(cfg, dp)
    _check_reward(cfg)
    _check_trainer(cfg)


def pretrain_runs(cfg: R1Config) -> bool:
    """Whether the run builds its base model by pre-training (no checkpoint to start from)."""
    return cfg.pretrain.enabled and not (cfg.model.hf_path or cfg.model.mcore_path)


def _check_data(cfg: R1Config, dp: Optional[int]) -> None:
    d = cfg.data
    require(d.name != "files" or bool(d.train_path), "data.name=files needs data.train_path (JSONL or Parquet)")
    require(d.prompts_per_step >= 1, f"data.prompts_per_step must be >= 1, got {d.prompts_per_step}")
    if dp is not None:
        require(d.prompts_per_step % dp == 0,
                f"data.prompts_per_step={d.prompts_per_step} must be a multiple of the data-parallel size {dp}")
    longest = d.max_prompt_tokens + cfg.rollout.max_new_tokens
    require(longest <= cfg.model.max_position_embeddings,
            f"data.max_prompt_tokens + rollout.max_new_tokens = {longest} exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}")


def _check_pretrain(cfg: R1Config, dp: Optional[int]) -> None:
    w = cfg.pretrain
    require(0.0 <= w.correct_fraction <= 1.0, f"pretrain.correct_fraction={w.correct_fraction} is not in [0, 1]")
    require(w.micro_batch_size >= 1, "pretrain.micro_batch_size must be >= 1")
    require(not (pretrain_runs(cfg) and w.corpus == "task" and cfg.data.name == "files"),
            "data=files with no model.hf_path or model.mcore_path: the built-in base model is pre-trained on a "
            "built-in task's documents; set model.hf_path to your base model (or pretrain.enabled=false to start "
            "from random weights)")
    require(not (pretrain_runs(cfg) and cfg.parallel.cp > 1),
            "parallel.cp > 1: the built-in base model's pre-training does not split its sequences over "
            "context-parallel ranks; build it with parallel.cp=1 first (it is cached under pretrain.cache_dir), "
            "or give model.mcore_path or model.hf_path")
    if dp is not None and pretrain_runs(cfg):
        unit = w.micro_batch_size * dp
        require(w.global_batch_size % unit == 0,
                f"pretrain.global_batch_size={w.global_batch_size} must be a multiple of "
                f"pretrain.micro_batch_size x dp = {w.micro_batch_size} x {dp}")


def _check_algorithm(cfg: R1Config, dp: Optional[int]) -> None:
    a = cfg.algorithm
    distilling_only = a.opd is not None and not a.opd.reward_weight  # no reward advantage to compute
    require(a.group_size >= 2 or a.advantage == "batch_std" or distilling_only,
            f"algorithm.group_size={a.group_size}: group advantages need at least 2 responses per prompt")
    require(a.eps_low >= 0 and a.eps_high >= 0, "algorithm.eps_low and eps_high must be >= 0")
    require(a.dual_clip is None or a.dual_clip > 1.0, f"algorithm.dual_clip={a.dual_clip} must be > 1")
    require(a.kl_beta >= 0, f"algorithm.kl_beta={a.kl_beta} must be >= 0")
    require(a.ppo_epochs >= 1 and a.minibatches >= 1, "algorithm.ppo_epochs and minibatches must be >= 1")
    _check_correction(a)
    require(a.max_extra_rounds >= 0, "algorithm.max_extra_rounds must be >= 0")
    rows = cfg.data.prompts_per_step * a.group_size
    require(rows >= a.minibatches, f"algorithm.minibatches={a.minibatches} exceeds the {rows} responses per step")
    require(not a.use_rollout_logprobs or a.correction == CorrectionConfig(),
            "algorithm.use_rollout_logprobs takes the engine's log-probs as the old policy, so "
            "algorithm.correction has no trainer log-probs to correct them with (every ratio would be 1)")
    _check_routing_replay(cfg)
    _check_opd(cfg, dp)


def _check_opd(cfg: R1Config, dp: Optional[int]) -> None:
    """On-policy distillation: a teacher to score with, in a layout of the job's ranks. Its tokenizer and
    architecture are checked against the student's where its files are read (trainer/rl/teacher_check.py)."""
    o = cfg.algorithm.opd
    if o is None:
        return
    key, t = "algorithm.opd", cfg.algorithm.opd.teacher
    require(bool(t.path), f"{key}.teacher.path is not set: give the teacher's model folder (an r1mega stage's "
                          "model/ or an HF checkpoint)")
    require(o.kl_coef >= 0 and o.reward_weight >= 0, f"{key}.kl_coef and reward_weight must be >= 0")
    require(o.kl_coef > 0 or o.reward_weight > 0, f"{key}.kl_coef and reward_weight are both 0: nothing to learn from")
    require(o.kl_clip is None or o.kl_clip > 0, f"{key}.kl_clip={o.kl_clip} must be > 0")
    require(0 <= o.top_k <= cfg.model.vocab_size, f"{key}.top_k={o.top_k} must be in [0, model.vocab_size]")
    require(not (o.top_k and o.kl_clip is not None), f"{key}.kl_clip clips the sampled tokens' log-ratios, which "
            f"{key}.top_k={o.top_k} replaces with a loss over the teacher's top tokens; set one of them")
    require(cfg.algorithm.ratio_level == "token", f"{key}: the teacher's advantages are per token; "
            "algorithm.ratio_level=sequence (GSPO) gives a whole response one ratio")
    p = t.parallel
    require(p.cp == 1, f"{key}.teacher.parallel.cp={p.cp}: the teacher scores whole rows (cp 1)")
    require(p.vpp is None and p.nproc is None and p.pipeline_layout is None,
            f"{key}.teacher.parallel: vpp, nproc and pipeline_layout are the student's to set; the teacher takes "
            "tp, pp, ep, etp and sequence_parallel")
    require(min(p.tp, p.pp, p.ep) >= 1, f"{key}.teacher.parallel: tp, pp and ep must be >= 1")
    require(t.micro_batch_tokens is None or t.micro_batch_tokens >= 1,
            f"{key}.teacher.micro_batch_tokens={t.micro_batch_tokens} must be >= 1")
    require(not (cfg.algorithm.dynamic_sampling and not o.reward_weight),
            "algorithm.dynamic_sampling drops groups whose rewards are all equal; with algorithm.opd.reward_weight=0 "
            "the rewards train nothing and those groups carry the teacher's signal as much as any")
    if dp is not None:  # the rest of the teacher's layout is checked with its model (teacher_check.py)
        s = cfg.parallel
        world = dp * s.tp * s.pp * s.cp
        require(world % (p.tp * p.pp) == 0,
                f"{key}.teacher.parallel: tp x pp = {p.tp} x {p.pp} must divide the {world} ranks of the job")


def _check_routing_replay(cfg: R1Config) -> None:
    a, mode = cfg.algorithm, cfg.algorithm.routing_replay
    if mode == "none":
        return
    key = f"algorithm.routing_replay={mode}"
    require(cfg.model.moe is not None, f"{key}: model {cfg.model.name} has no MoE layers to route")
    require(cfg.model.moe.load_balancing_type != "sinkhorn",
            f"{key}: sinkhorn routing (model.moe.load_balancing_type) does not go through megatron's top-k "
            "routing, where replay happens")
    if mode == "old":
        require((a.ppo_epochs > 1 or a.minibatches > 1) and not a.use_rollout_logprobs,
                f"{key} replays the old policy's log-prob pass in later minibatches; with one minibatch, one "
                "epoch, or algorithm.use_rollout_logprobs there is no such pass (the update routes as the old "
                "policy does anyway)")
    else:
        r = cfg.rollout.asynchronous
        require(cfg.rollout.mode == "sync" or not (r.partial and r.partial_kv == "recompute"),
                f"{key} with rollout.asynchronous.partial_kv=recompute: after a weight update a position's cached "
                "keys come from new routing and its sampled token from the old, so no one routing reproduces the "
                "row; use partial_kv=keep")


def _check_correction(a) -> None:
    c, key = a.correction, "algorithm.correction"
    require(c.weight_cap is None or c.weight is not None, f"{key}.weight_cap is set but {key}.weight is not")
    require(c.weight_cap is None or c.weight_cap >= 1.0, f"{key}.weight_cap={c.weight_cap} must be >= 1")
    require(c.weight != "sequence" or c.weight_cap is not None,
            f"{key}.weight=sequence needs a weight_cap: a product of ratios over a long response reaches any size")
    bounds = (c.reject_low, c.reject_high)
    require(c.reject is None or bounds != (None, None),
            f"{key}.reject={c.reject} needs reject_low, reject_high or both")
    require(c.reject is not None or bounds == (None, None), f"{key}.reject_low/high are set but {key}.reject is not")
    for name in ("reject_low", "reject_high"):  # ratios are bounded by e^+-20 (LOG_RATIO_BOUND)
        value = getattr(c, name)
        require(value is None or 3e-9 < value < 4e8, f"{key}.{name}={value} must be in (3e-9, 4e8)")
    require(c.reject_low is None or c.reject_high is None or c.reject_low < c.reject_high,
            f"{key}.reject_low={c.reject_low} must be below reject_high={c.reject_high}")
    require(c.veto is None or 3e-9 < c.veto < 1, f"{key}.veto={c.veto} must be in (3e-9, 1)")


def _check_rollout(cfg: R1Config, dp: Optional[int]) -> None:
    r = cfg.rollout
    require(r.temperature > 0, f"rollout.temperature={r.temperature} must be > 0 for sampled rollouts")
    require(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} is not in (0, 1]")
    require(r.top_k == -1 or r.top_k > 0, f"rollout.top_k={r.top_k} must be -1 (off) or positive")
    require(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    require(r.max_batch_size >= cfg.algorithm.group_size,
            f"rollout.max_batch_size={r.max_batch_size} must hold one prompt's algorithm.group_size="
            f"{cfg.algorithm.group_size} samples (they decode together from one prefill)")
    require(r.eval_temperature >= 0 and r.eval_samples >= 0,
            "rollout.eval_temperature and rollout.eval_samples must be >= 0")
    if r.engine == "sglang":
        _check_sglang(cfg, dp)
    _check_async(cfg)


def _check_async(cfg: R1Config) -> None:
    r, a, w = cfg.rollout, cfg.algorithm, cfg.rollout.asynchronous
    if r.mode == "sync":
        require(a.max_staleness == 0, f"algorithm.max_staleness={a.max_staleness} bounds rollout.mode=async; "
                                      "synchronous rollouts are on-policy (set rollout.mode=async)")
        return
    if one_step_off_policy(cfg):
        _check_one_step_off(cfg)
        return
    if r.engine == "sglang":
        require(w.workers == 1, f"rollout.asynchronous.workers={w.workers}: with rollout.engine=sglang the engines are "
                                "the rollout workers (rollout.sglang.num_gpus / tp); leave workers at 1")
        require(w.on_worker_failure == "stop", "rollout.asynchronous.on_worker_failure=continue with "
                                               "rollout.engine=sglang: the engines share one weight-update group, "
                                               "which cannot drop a member; a lost engine stops the run")
        require(not w.partial or w.partial_kv == "recompute",
                "rollout.asynchronous.partial_kv=keep with rollout.engine=sglang: SGLang keeps the KV cache only "
                "with pause mode in_place, whose cache flush is refused while requests run, so later requests "
                "would reuse KV of the old weights; use partial_kv=recompute (pause mode retract)")
    require(a.max_staleness >= 0, f"algorithm.max_staleness={a.max_staleness} must be >= 0")
    require(w.workers >= 1, f"rollout.asynchronous.workers={w.workers} must be >= 1")
    require(w.worker_timeout_s > 0, f"rollout.asynchronous.worker_timeout_s={w.worker_timeout_s} must be > 0")
    per_request = w.prompts_per_request or cfg.data.prompts_per_step
    require(per_request >= 1 and cfg.data.prompts_per_step % per_request == 0,
            f"rollout.asynchronous.prompts_per_request={w.prompts_per_request} must divide data.prompts_per_step="
            f"{cfg.data.prompts_per_step} (0: a step's prompts in one request)")
    require(1 <= w.weight_sync_every <= a.max_staleness + 1,
            f"rollout.asynchronous.weight_sync_every={w.weight_sync_every} must be in [1, algorithm.max_staleness "
            f"+ 1 = {a.max_staleness + 1}]: between two syncs the workers' weights lag by up to k - 1 steps")
    require(not a.dynamic_sampling, "algorithm.dynamic_sampling with rollout.mode=async is not supported: the "
                                    "rollout workers generate a step's prompts ahead of time; use rollout.mode=sync")


def one_step_off_policy(cfg: R1Config) -> bool:
    """rollout.mode=async on colocated SGLang engines: no rollout workers; the next step's groups are
    generated during this step (r1mega/trainer/rl/one_step_off.py)."""
    r = cfg.rollout
    return r.mode == "async" and r.engine == "sglang" and r.sglang.mode == "colocated"


def _check_one_step_off(cfg: R1Config) -> None:
    """rollout.mode=async with colocated engines: the next step's groups generate during this step's
    scoring and log-prob passes, under the weights of the step before (trainer/rl/one_step_off.py)."""
    a, w = cfg.algorithm, cfg.rollout.asynchronous
    why = "with colocated engines (rollout.sglang.mode=colocated) rollout.mode=async is one step off-policy"
    require(a.max_staleness == 1, f"algorithm.max_staleness={a.max_staleness}: {why}, so every sample after the "
                                  "first step's lags one version; set max_staleness=1, or use rollout.mode=sync")
    require(not w.partial, f"rollout.asynchronous.partial=true: {why}, and a colocated engine never takes weights "
                           "while it generates (it holds the GPUs the update needs)")
    defaults = type(w)()
    for key in ("workers", "prompts_per_request", "weight_sync_every", "on_worker_failure"):
        value = getattr(w, key)
        require(value == getattr(defaults, key), f"rollout.asynchronous.{key}={value}: {why}, with no rollout "
                "workers: the engines generate a step's groups in one call and take the weights at every step "
                "(leave it at its default)")
    require(not a.dynamic_sampling, "algorithm.dynamic_sampling with rollout.mode=async is not supported: the next "
                                    "step's groups are generated ahead of time; use rollout.mode=sync")


def _check_sglang(cfg: R1Config, dp: Optional[int]) -> None:
    g = cfg.rollout.sglang
    require(g.tp >= 1, f"rollout.sglang.tp={g.tp} must be >= 1")
    require(0.0 < g.mem_fraction_static < 1.0,
            f"rollout.sglang.mem_fraction_static={g.mem_fraction_static} is not in (0, 1)")
    require(g.bucket_mb > 0, f"rollout.sglang.bucket_mb={g.bucket_mb} must be > 0")
    require(g.base_gpu_id >= 0, f"rollout.sglang.base_gpu_id={g.base_gpu_id} must be >= 0")
    require(1 <= g.port <= 65535 and 1 <= g.nccl_port <= 65535, "rollout.sglang.port and nccl_port must be TCP ports")
    if g.mode == "disaggregated":
        require(g.num_gpus is not None and g.num_gpus >= g.tp and g.num_gpus % g.tp == 0,
                f"rollout.sglang.mode=disaggregated needs rollout.sglang.num_gpus, a positive multiple of "
                f"rollout.sglang.tp={g.tp} (got {g.num_gpus})")
    require(not g.offload_params or cfg.optimizer.distributed,
            "rollout.sglang.offload_params needs optimizer.distributed=true (megatron keeps parameters in one "
            "offloadable buffer only then)")
    p = cfg.parallel
    if dp is not None and g.mode == "colocated":
        world = dp * p.tp * p.pp * p.cp
        require(world % g.tp == 0, f"rollout.sglang.tp={g.tp} must divide the world size {world} (colocated engines "
                "take the trainer's GPUs in blocks of tp)")


def _check_reward(cfg: R1Config) -> None:
    r = cfg.reward
    require(bool(r.components) or bool(r.custom), "reward.components is empty: nothing would be rewarded")
    require(r.timeout_s > 0, f"reward.timeout_s={r.timeout_s} must be > 0")
    require(r.num_workers >= 0, "reward.num_workers must be >= 0")
    for name in r.components:
        require(name in BUILTIN_REWARDS, f"reward.components.{name} is not a built-in reward "
                f"({', '.join(BUILTIN_REWARDS)}); add your own under reward.custom with a _target_")
    for name, spec in r.custom.items():
        require(isinstance(spec, dict) and "_target_" in spec,
                f"reward.custom.{name} needs a _target_ (a dotted path to a function of a RewardInput)")
    if r.code is not None:
        c = r.code
        require(c.test_timeout_s > 0 and c.budget_s > 0,
                f"reward.code.test_timeout_s={c.test_timeout_s} and budget_s={c.budget_s} must be > 0")
        limits = {"workers": c.workers, "cpu_s": c.cpu_s, "memory_mb": c.memory_mb, "processes": c.processes,
                  "file_size_mb": c.file_size_mb, "open_files": c.open_files, "output_bytes": c.output_bytes,
                  "work_mb": c.work_mb}
        bad = [f"reward.code.{k}={v}" for k, v in limits.items() if v < 1]
        require(not bad, f"{', '.join(bad)}: the sandbox's limits must be >= 1")


def _check_trainer(cfg: R1Config) -> None:
    t = cfg.trainer
    require(t.steps >= 0, "trainer.steps must be >= 0")
    require(t.micro_batch_tokens >= 1, "trainer.micro_batch_tokens must be >= 1")
    require(t.pack or cfg.parallel.cp == 1, "parallel.cp > 1 splits THD packs over context-parallel ranks; "
            "it needs trainer.pack=true")
    require(t.eval_every >= 0 and t.save_every >= 0, "trainer.eval_every and trainer.save_every must be >= 0")
