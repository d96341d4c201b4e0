"""Held-out evaluation: greedy pass@1 and sampled pass@k with the rollout engine and the reward stack."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict

import torch

from r1mega.platform.distributed import dp_share, dp_sum
from r1mega.rollout.types import SamplingParams
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.offload import rollout_turn, training_turn
from r1mega.trainer.rl.step import generate, score


def _accuracy(ctx: RLContext, prompts: list, params: SamplingParams, n: int) -> torch.Tensor:
    """Accuracy [prompts, n] of n responses per prompt."""
    recording = getattr(ctx.engine, "record_routing", False)
    if recording:  # no training on these rows: their routing is not kept
        ctx.engine.record_routing = False
    try:
        records, rollouts, stream = generate(ctx, prompts, params, n)
    finally:
        if recording:
            ctx.engine.record_routing = True
    scores = score(ctx, records, rollouts, stream)
    lengths = torch.tensor(rollouts.response_lengths, dtype=torch.float32)
    shape = (len(prompts), n)
    return scores.components["accuracy"].view(shape), scores.total.view(shape), lengths.view(shape)


def evaluate(ctx: RLContext, seed: int = 0) -> Dict[str, float]:
    """eval/greedy_accuracy, eval/pass_at_k, eval/mean_at_k, eval/reward, eval/length_mean (all ranks)."""
    if not ctx.test_records:
        return {}
    rollout_turn(ctx)  # an engine with its own weights gets the current ones (and the GPUs)
    try:
        return _evaluate(ctx, seed)
    finally:
        training_turn(ctx)


def _evaluate(ctx: RLContext, seed: int) -> Dict[str, float]:
    rows, count = dp_share(ctx.test_records, ctx.test_records[0])  # padding rows are not counted
    real = torch.tensor([float(i < count) for i in range(len(rows))])
    r = ctx.cfg.rollout
    greedy = replace(ctx.sampling, temperature=r.eval_temperature, seed=seed)  # top-k/p unused when greedy
    acc, reward, length = _accuracy(ctx, rows, greedy, 1)
    values = [float((acc[:, 0] * real).sum()), float((reward[:, 0] * real).sum()),
              float((length[:, 0] * real).sum()), float(real.sum())]
    k = r.eval_samples
    if k > 0:
        sampled = replace(ctx.sampling, seed=seed + 1)
        acc_k, _, _ = _accuracy(ctx, rows, sampled, k)
        values += [float(((acc_k.max(dim=1).values >= 1.0).float() * real).sum()),
                   float((acc_k.mean(dim=1) * real).sum())]
    sums = dp_sum(values)
    n = max(sums[3], 1.0)
    out = {"eval/greedy_accuracy": sums[0] / n, "eval/reward": sums[1] / n, "eval/length_mean": sums[2] / n,
           "eval/prompts": sums[3]}
    if k > 0:
        out.update({"eval/pass_at_k": sums[4] / n, "eval/mean_at_k": sums[5] / n, "eval/k": float(k)})
    return out
