"""One RL step, read top to bottom as its phases, and the metrics it reports."""

from __future__ import annotations

import time
from typing import Dict

import torch
import torch.distributed as dist

from r1mega.trainer import rl_phases as phases
from r1mega.trainer.lm_step import current_lr
from r1mega.trainer.rl_batch import StepBatch
from r1mega.trainer.rl_context import RLContext
from r1mega.trainer.rl_setup import copy_weights
from r1mega.trainer.timing import PhaseTimer


def rl_step(ctx: RLContext, step: int) -> Dict[str, float]:
    """Weight sync -> generate -> score -> advantages -> log-probs -> update; `step` counts from 1.

    The sync (a no-op for the native engine) opens the engine's turn on the GPUs; the release
    after scoring gives them back to training."""
    timer, start = PhaseTimer(), time.perf_counter()
    lr = current_lr(ctx.optimizer)
    with timer("sync"):
        sync = phases.rollout_turn(ctx)
    prompts = ctx.sampler.next_batch()
    gen = phases.generate_and_score(ctx, prompts, timer)
    with timer("release"):
        phases.training_turn(ctx)
    with timer("advantages"):
        adv = phases.advantages(ctx, gen)
        batch = StepBatch.from_rollouts(gen.rollouts, adv)
    with timer("logprobs"):
        phases.logprobs(ctx, batch)
    with timer("update"):
        stats = phases.update(ctx, batch, step)
    every = ctx.cfg.algorithm.ref_reset_every
    if ctx.ref_chunks is not None and every and step % every == 0:
        copy_weights(ctx.chunks, ctx.ref_chunks)
    return {**rollout_metrics(ctx, gen, adv), **stats, **sync, "lr": lr,
            **throughput(gen, time.perf_counter() - start), **timer.metrics()}


def rollout_metrics(ctx: RLContext, gen: phases.Generated, adv: torch.Tensor) -> Dict[str, float]:
    """Reward (total and per component), accuracy, lengths, truncation: means over all ranks' rows."""
    s, lengths = gen.scores, torch.tensor(gen.rollouts.response_lengths, dtype=torch.float64)
    truncated = sum(r == "length" for r in gen.rollouts.finish_reasons)
    names = list(s.components)
    sums = phases.dp_sum([float(s.total.sum()), *[float(s.components[k].sum()) for k in names],
                          float(lengths.sum()), float(truncated), float(len(lengths)), float(s.failures),
                          float(s.timeouts), float(adv.abs().sum()), float(gen.varied_share), 1.0])
    longest = phases.dp_sum([float(lengths.max()) if len(lengths) else 0.0], op=dist.ReduceOp.MAX)[0]
    n = max(sums[len(names) + 3], 1.0)
    out = {"reward/mean": sums[0] / n}
    out.update({f"reward/{k}": sums[1 + i] / n for i, k in enumerate(names)})
    base = len(names) + 1
    out.update({
        "response/length_mean": sums[base] / n,
        "response/length_max": longest,
        "response/truncated_share": sums[base + 1] / n,
        "reward/failures": sums[base + 3],
        "reward/timeouts": sums[base + 4],
        "advantage/abs_mean": sums[base + 5] / n,
        "rollout/varied_group_share": sums[base + 6] / sums[base + 7],
        "rollout/rounds": float(gen.rounds),
    })
    return out


def throughput(gen: phases.Generated, seconds: float) -> Dict[str, float]:
    """Tokens (prompt + response) and samples per second of this step, over all data-parallel ranks."""
    tokens = sum(len(p) + len(r) for p, r in zip(gen.rollouts.prompt_ids, gen.rollouts.response_ids))
    tokens, samples = phases.dp_sum([float(tokens), float(len(gen.rollouts))])
    return {"perf/tokens_per_s": tokens / seconds, "perf/samples_per_s": samples / seconds, "time/step": seconds}
