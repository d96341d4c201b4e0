"""Rules of `r1mega-bench` (the `bench` group), checked before any rank starts."""

from __future__ import annotations

from typing import Optional

from r1mega.config.errors import one_of, require
from r1mega.config.schema import R1Config

SUITES = ("step", "train", "rollout", "peer")
# algorithm fields TRL's GRPOTrainer has no counterpart for, with the value it implies
TRL_FIXED = {"ppo_epochs": 1, "minibatches": 1, "dynamic_sampling": False, "tis_cap": None, "dual_clip": None,
             "entropy_coeff": 0.0, "use_rollout_logprobs": False, "ratio_level": "token"}


def check_bench(cfg: R1Config, world_size: Optional[int] = None) -> None:
    b = cfg.bench
    require(bool(b.suites), "bench.suites is empty; choose from " + ", ".join(SUITES))
    for suite in b.suites:
        one_of(suite, SUITES, "bench.suites")
    require(b.warmup >= 0 and b.repeats >= 1,
            f"bench.warmup={b.warmup} must be >= 0 and bench.repeats={b.repeats} >= 1")
    require(b.peak_tflops is None or b.peak_tflops > 0, f"bench.peak_tflops={b.peak_tflops} must be positive")
    require(bool(b.train.models) and b.train.seq_length > 0 and b.train.micro_batch_size > 0
            and b.train.micro_batches > 0, "bench.train: models must be listed and sizes positive")
    for i, layout in enumerate(b.train.layouts):
        require(min(layout.tp, layout.pp, layout.dp, layout.ep) >= 1, f"bench.train.layouts[{i}]: sizes must be >= 1")
    require(bool(b.rollout.batch_sizes) and min(b.rollout.batch_sizes) >= 1 and b.rollout.new_tokens >= 1,
            "bench.rollout: batch_sizes and new_tokens must be positive")
    if "peer" in b.suites:
        check_peer(cfg)


def check_peer(cfg: R1Config) -> None:
    """The peer run is the same algorithm on both sides: only settings TRL's GRPOTrainer has."""
    p, a = cfg.bench.peer, cfg.algorithm
    require(min(p.prompts_per_step, p.group_size, p.max_new_tokens, p.steps, p.rounds) >= 1,
            "bench.peer: prompts_per_step, group_size, max_new_tokens, steps and rounds must be >= 1")
    require(p.group_size >= 2, f"bench.peer.group_size={p.group_size}: GRPO needs groups of 2 or more")
    require(p.steps > cfg.bench.warmup, f"bench.peer.steps={p.steps} must exceed bench.warmup={cfg.bench.warmup}")
    one_of(a.advantage, {"grpo", "drgrpo"}, "algorithm.advantage (bench peer: TRL has these two)")
    one_of(a.loss_agg, {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}, "algorithm.loss_agg")
    require(a.kl_estimator == "k3" or p.kl_beta == 0, "bench peer: TRL's KL term is the k3 estimator")
    require(a.std == "sample", "bench peer: TRL scales advantages by the sample std (algorithm.std=sample)")
    for key, value in TRL_FIXED.items():
        require(getattr(a, key) == value, f"bench peer: algorithm.{key}={getattr(a, key)!r} has no TRL "
                                          f"counterpart; run it with {value!r}")
