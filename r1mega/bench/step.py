"""End-to-end GRPO step: tokens/s, samples/s, time per phase, peak memory, model FLOPs and MFU.

Runs the configured RL step (model, data, algorithm, rollout, parallel layout) on random
weights, so responses run to rollout.max_new_tokens unless a sampled EOS ends them early.
"""

from __future__ import annotations

import copy
from typing import Dict, List

from r1mega.bench.flops import causal_context, device_peak_tflops, forward_flops_per_token, mfu
from r1mega.bench.measure import max_over_ranks, median, peak_memory_mb, timed
from r1mega.config.schema import R1Config
from r1mega.platform.distributed import running
from r1mega.platform.launch import spawn
from r1mega.platform.logs import setup_logging
from r1mega.trainer.rl.setup import setup
from r1mega.trainer.rl.logprob_passes import needs_old_logprobs
from r1mega.trainer.rl.step import rl_step

PHASES = ("sync", "generate", "score", "release", "advantages", "logprobs", "update")


def run(cfg: R1Config) -> Dict:
    cfg = copy.deepcopy(cfg)
    cfg.pretrain.enabled = False  # random weights unless model.hf_path / mcore_path name a model
    world = cfg.parallel.nproc or 1
    steps = spawn(world, _rank, cfg, timeout=3600.0)[0]
    return summarize(cfg, steps, world)


def _rank(cfg: R1Config) -> List[Dict[str, float]]:
    setup_logging()
    with running(cfg.parallel, cfg.trainer.seed) as runtime:
        ctx = setup(cfg, runtime)
        try:  # rl_step times its own phases; the wall time of each call adds nothing
            rows = [metrics for _, metrics in timed(lambda step: rl_step(ctx, step), cfg.bench.warmup,
                                                      cfg.bench.repeats)]
        finally:
            if ctx.rewards is not None:
                ctx.rewards.close()
        peak = max_over_ranks(peak_memory_mb())
        return [{**r, **peak} for r in rows]


def step_flops(cfg: R1Config, prompt_tokens: float, response_tokens: float, per_token: float) -> float:
    """Model FLOPs of a step: generation prefills each prompt once (its group shares it) and
    decodes every response token; each log-prob pass (reference; old policy when the update
    needs it) and each update epoch (forward and backward) covers every token."""
    a = cfg.algorithm
    passes = (a.kl_beta > 0) + needs_old_logprobs(a) + 3 * a.ppo_epochs
    generated = prompt_tokens / a.group_size + response_tokens
    return (generated + passes * (prompt_tokens + response_tokens)) * per_token


def summarize(cfg: R1Config, steps: List[Dict[str, float]], world: int) -> Dict:
    """Medians over the timed steps."""
    seconds = median([s["time/step"] for s in steps])
    tokens = median([s["perf/tokens_per_s"] * s["time/step"] for s in steps])
    samples = median([s["perf/samples_per_s"] * s["time/step"] for s in steps])
    responses = samples * median([s["response/length_mean"] for s in steps])
    per_token = forward_flops_per_token(cfg.model, causal_context(tokens / max(samples, 1.0)))
    flops = step_flops(cfg, tokens - responses, responses, per_token)
    peak = device_peak_tflops(cfg.bench.peak_tflops, cfg.model.dtype)
    memory = {k: max(s[k] for s in steps) for k in steps[0] if k.startswith("peak_")}
    return {
        "model": cfg.model.name, "algorithm": cfg.algorithm.name, "ranks": world,
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep},
        "prompts_per_step": cfg.data.prompts_per_step, "group_size": cfg.algorithm.group_size,
        "max_new_tokens": cfg.rollout.max_new_tokens, "timed_steps": len(steps),
        "step_s": seconds, "tokens_per_step": tokens, "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "response_length_mean": responses / max(samples, 1.0),
        "phase_s": {p: median([s.get(f"time/{p}", 0.0) for s in steps]) for p in PHASES},
        "model_gflops_per_token": per_token / 1e9, "model_tflops_per_step": flops / 1e12,
        "mfu": mfu(flops, seconds, peak, world),
        **memory,
    }
