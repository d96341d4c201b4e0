"""Rules of `r1mega-bench` (the `bench` group), checked before any rank starts."""

from __future__ import annotations

from typing import Optional, get_args

from r1mega.config.choices import BenchSuite
from r1mega.config.errors import one_of, require
from r1mega.config.loader import CONF_DIR
from r1mega.config.schema import CorrectionConfig, R1Config

SUITES = get_args(BenchSuite)
# algorithm fields TRL's GRPOTrainer has no counterpart for, with the value it implies
TRL_FIXED = {"ppo_epochs": 1, "minibatches": 1, "dynamic_sampling": False, "dual_clip": None,
             "entropy_coeff": 0.0, "use_rollout_logprobs": False, "ratio_level": "token"}


def _model_preset(name: str, key: str) -> None:
    presets = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    require(name in presets, f"{key}: no model preset {name!r} in conf/model (there are: {', '.join(presets)})")


def _positive(value: int, key: str) -> None:
    require(value >= 1, f"{key}={value} must be >= 1")


def check_bench(cfg: R1Config, world_size: Optional[int] = None) -> None:
    b = cfg.bench
    require(bool(b.suites), "bench.suites is empty; choose from " + ", ".join(SUITES))
    require(b.warmup >= 0, f"bench.warmup={b.warmup} must be >= 0")
    _positive(b.repeats, "bench.repeats")
    require(b.peak_tflops is None or b.peak_tflops > 0, f"bench.peak_tflops={b.peak_tflops} must be positive")
    require(bool(b.train.models), "bench.train.models is empty")
    for i, model in enumerate(b.train.models):
        _model_preset(model, f"bench.train.models[{i}]")
    for key in ("seq_length", "micro_batch_size", "micro_batches"):
        _positive(getattr(b.train, key), f"bench.train.{key}")
    for i, layout in enumerate(b.train.layouts):
        for key in ("tp", "pp", "dp", "ep"):
            _positive(getattr(layout, key), f"bench.train.layouts[{i}].{key}")
    require(bool(b.rollout.batch_sizes), "bench.rollout.batch_sizes is empty")
    for i, size in enumerate(b.rollout.batch_sizes):
        _positive(size, f"bench.rollout.batch_sizes[{i}]")
    _positive(b.rollout.new_tokens, "bench.rollout.new_tokens")
    require(b.rollout.new_tokens < cfg.model.max_position_embeddings,
            f"bench.rollout.new_tokens={b.rollout.new_tokens} leaves no room for a prompt within "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    require(bool(b.rollout.prompt_sets), "bench.rollout.prompt_sets is empty")
    _positive(b.rollout.prompt_median, "bench.rollout.prompt_median")
    require(b.rollout.prompt_p99 >= b.rollout.prompt_median,
            f"bench.rollout.prompt_p99={b.rollout.prompt_p99} is below bench.rollout.prompt_median="
            f"{b.rollout.prompt_median}")
    if "peer" in b.suites:
        check_peer(cfg)
    if "async" in b.suites:
        w = b.asynchronous
        for key in ("steps", "ranks", "workers", "runs"):
            _positive(getattr(w, key), f"bench.asynchronous.{key}")
        require(w.workers < w.ranks, f"bench.asynchronous.workers={w.workers} leaves no trainer rank of "
                                     f"bench.asynchronous.ranks={w.ranks}")
        require(w.max_staleness >= 0, f"bench.asynchronous.max_staleness={w.max_staleness} must be >= 0")
        require(cfg.data.name in ("arithmetic", "countdown"), f"bench async: data.name={cfg.data.name!r}; both "
                "sides start from the built-in task's base model (arithmetic or countdown)")


def check_peer(cfg: R1Config) -> None:
    """The peer run is the same algorithm on both sides: only settings TRL's GRPOTrainer has."""
    p, a = cfg.bench.peer, cfg.algorithm
    for key in ("steps", "eval_every", "runs"):
        _positive(getattr(p, key), f"bench.peer.{key}")
    require(all(0.0 < t <= 1.0 for t in p.targets), f"bench.peer.targets={p.targets}: accuracies in (0, 1]")
    require(cfg.data.name in ("arithmetic", "countdown"), f"bench peer: data.name={cfg.data.name!r}; the race "
            "starts from the built-in task's base model (arithmetic or countdown)")
    require(cfg.data.template != "chat", "bench peer: data.template=chat; both sides read prompts rendered as text")
    require(not cfg.reward.custom, f"bench peer: reward.custom={sorted(cfg.reward.custom)}; TRL's side scores "
                                   "with the built-in components only")
    one_of(cfg.optimizer.name, {"adam"}, "optimizer.name (bench peer: TRL's side runs AdamW)")
    one_of(a.advantage, {"grpo", "drgrpo"}, "algorithm.advantage (bench peer: TRL has these two)")
    require(a.kl_estimator == "k3" or a.kl_beta == 0,
            f"bench peer: algorithm.kl_estimator={a.kl_estimator!r}; TRL's KL term is k3")
    require(a.std == "sample", f"bench peer: algorithm.std={a.std!r}; TRL scales advantages by the sample std")
    for key, value in TRL_FIXED.items():
        require(getattr(a, key) == value, f"bench peer: algorithm.{key}={getattr(a, key)!r} has no TRL "
                                          f"counterpart; run it with {value!r}")
    require(a.correction == CorrectionConfig(), "bench peer: algorithm.correction has no TRL counterpart; run "
                                                "without it")
