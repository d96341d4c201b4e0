"""One RL step, read top to bottom as its phases, and the metrics it reports.

Every rank of a replica group (the TP x PP x CP ranks of one data-parallel rank) holds the same
prompts and rollouts; ranks of different data-parallel groups hold different ones. Rewards are
computed once per replica group and broadcast, so all its ranks train on identical numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state as ps

from r1mega.algorithms.advantages import group_advantages
from r1mega.algorithms.filtering import varied_groups
from r1mega.algorithms.off_policy import empty_histogram
from r1mega.models.mtp import mtp_metrics
from r1mega.ops.advantage import group_offsets, kernel_group_advantages
from r1mega.platform.distributed import current_device, dp_max, dp_sum, replica_broadcast
from r1mega.rewards.code import OUTCOMES
from r1mega.rewards.stack import StreamingScore
from r1mega.rollout.ledger import staleness_metrics
from r1mega.rollout.setup import reward_input, reward_inputs
from r1mega.rollout.types import Rollouts, SamplingParams
from r1mega.trainer.forward_backward import train_step
from r1mega.trainer.model_setup import copy_weights
from r1mega.trainer.optimizer import current_lr
from r1mega.trainer.rl.batch import MicroBatch, StepBatch, balance_over_dp, layout_stats, micro_batches
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.logprob_passes import logprobs
from r1mega.trainer.rl.loss import LossSettings, policy_loss, ratio_quantiles, reduce_stats
from r1mega.trainer.rl.offload import rollout_turn, training_turn
from r1mega.trainer.rl.routing import replay_metrics
from r1mega.trainer.timing import PhaseTimer


@dataclass
class Scores:
    total: torch.Tensor  # [N]
    components: Dict[str, torch.Tensor]  # name -> [N], unweighted
    failures: int = 0
    timeouts: int = 0
    code_tests: Dict[str, int] = field(default_factory=dict)  # reward.code: how the programs' tests ended


@dataclass
class Generated:
    records: list  # the prompt record of each row
    rollouts: Rollouts
    scores: Scores
    rounds: int = 1  # generation rounds (dynamic sampling adds some)
    varied_share: float = 1.0  # share of first-round groups whose rewards differ


def rl_step(ctx: RLContext, step: int) -> Dict[str, float]:
    """Weight sync -> generate -> score -> advantages -> log-probs -> update; `step` counts from 1.

    The sync (a no-op for the native engine) opens the engine's turn on the GPUs; the release
    after scoring gives them back to training. Under rollout.mode=async the groups come from the
    rollout workers, or (colocated engines) were generated during the step before."""
    timer, start = PhaseTimer(), time.perf_counter()
    lr = current_lr(ctx.optimizer)
    ahead = ctx.one_step_off
    if ctx.async_rollout is not None:  # workers generated and scored this step's groups already (or still do)
        with timer("wait"):
            gen, sync = from_workers(ctx, step)
    elif ahead is not None:  # this step's groups came during the last step; the next step's start now
        with timer("sync"):
            sync = rollout_turn(ctx)
        records, rollouts = ahead.this_step(step, timer)
        with timer("score"):
            gen = Generated(records, rollouts, score(ctx, records, rollouts))
        sync.update(staleness_metrics(step, rollouts.versions, ctx.cfg.algorithm.max_staleness))
        if ctx.train_state is not None and ctx.train_state.offload_params:  # the log-prob passes need them back
            hand_back(ctx, step, timer)
    else:
        with timer("sync"):
            sync = rollout_turn(ctx)
        prompts = ctx.sampler.next_batch()
        gen = generate_and_score(ctx, prompts, timer)
        with timer("release"):
            training_turn(ctx)
    with timer("advantages"):
        adv = advantages(ctx, gen)
        batch = StepBatch.from_rollouts(gen.rollouts, adv)
        if ctx.cfg.algorithm.routing_replay == "rollout" and batch.routing is None:
            raise RuntimeError(f"step {step}: algorithm.routing_replay=rollout but the rollouts carry no routing")
        if ctx.cfg.trainer.pack:
            batch = balance_over_dp(batch)
    with timer("logprobs"):
        logprobs(ctx, batch)
    if ahead is not None:
        hand_back(ctx, step, timer)
    with timer("update"):
        stats = update(ctx, batch, step)
    every = ctx.cfg.algorithm.ref_reset_every
    if ctx.ref_chunks is not None and every and step % every == 0:
        copy_weights(ctx.chunks, ctx.ref_chunks)
    if ctx.async_rollout is not None:
        with timer("sync"):
            ctx.async_rollout.after_update(step)
    if ahead is not None:
        ahead.step_done()
    if ctx.cfg.algorithm.routing_replay != "none":
        stats.update(replay_metrics(ctx.chunks))
    return {**rollout_metrics(ctx, gen, adv), **stats, **sync, "lr": lr,
            **throughput(gen, time.perf_counter() - start), **timer.metrics()}


def hand_back(ctx: RLContext, step: int, timer: PhaseTimer) -> None:
    """One step off-policy: once the next step's groups are in, the engine gives the GPUs back."""
    if ctx.one_step_off.in_flight:
        with timer("wait"):
            ctx.one_step_off.collect(step)
    if ctx.train_state is not None and ctx.train_state.offloaded:
        with timer("release"):
            training_turn(ctx)


# -- generate and score ----------------------------------------------------------------------

def generate(ctx: RLContext, prompts: list, params: SamplingParams, n: int) -> Tuple[list, Rollouts,
                                                                                   Optional[StreamingScore]]:
    """(each row's prompt record, n rows per prompt, the rows' scoring if it already runs). On the rank that
    scores, the native engine hands each row to the reward workers as soon as it finishes, so scoring
    overlaps with the decoding of the longer rows (programs run while others still write theirs)."""
    stream = None
    if ctx.rewards is not None and hasattr(ctx.engine, "row_done"):
        decode = ctx.tokenizer.decode
        stream = ctx.rewards.streaming(lambda row, ids, reason: reward_input(prompts[row // n], ids, reason, decode))
        ctx.engine.row_done = stream.row_done
    try:
        rollouts = ctx.engine.generate([r.token_ids for r in prompts], params, n=n)
    finally:
        if stream is not None:
            ctx.engine.row_done = None
    return [prompts[g] for g in rollouts.group_index], rollouts, stream


def score(ctx: RLContext, records: list, rollouts: Rollouts, stream: Optional[StreamingScore] = None) -> Scores:
    """Rewards of every row, computed on the group's first rank (or collected from the scoring that
    started during generation) and shared with the others."""
    names, counted = ctx.reward_names, code_outcomes(ctx)
    # one tensor to broadcast: a row per total and component, the last column for the counts
    packed = torch.zeros(max(len(names) + 1, 2 + len(counted)), len(rollouts) + 1, dtype=torch.float64)
    if ctx.rewards is not None:
        result = stream.result(len(rollouts)) if stream is not None else \
            ctx.rewards.score(reward_inputs(records, rollouts, ctx.tokenizer.decode))
        packed[0, :-1] = torch.tensor(result.total, dtype=torch.float64)
        for i, name in enumerate(names):
            packed[i + 1, :-1] = torch.tensor(result.components[name], dtype=torch.float64)
        counts = [result.failures, result.timeouts, *[result.counts.get(k, 0) for k in counted]]
        packed[:len(counts), -1] = torch.tensor(counts, dtype=torch.float64)
    packed = replica_broadcast(packed)
    comps = {name: packed[i + 1, :-1] for i, name in enumerate(names)}
    return Scores(packed[0, :-1], comps, int(packed[0, -1]), int(packed[1, -1]),
                  {k: int(packed[2 + i, -1]) for i, k in enumerate(counted)})


def code_outcomes(ctx: RLContext) -> tuple:
    """The test outcomes counted per step when programs are scored (reward.code), else none."""
    return OUTCOMES if ctx.cfg.reward.code is not None else ()


def generate_and_score(ctx: RLContext, prompts: list, timer: PhaseTimer) -> Generated:
    """n responses per prompt, scored; with dynamic sampling, groups of equal rewards are
    replaced by new prompts' groups for up to max_extra_rounds more rounds (DAPO)."""
    a = ctx.cfg.algorithm
    target = len(prompts)
    kept, spare = [], []  # (records, rollouts, scores) of single groups
    batch, rounds, varied_share, failures, timeouts, tests = prompts, 0, 1.0, 0, 0, {}
    while True:
        with timer("generate"):
            records, rollouts, stream = generate(ctx, batch, ctx.sampling, a.group_size)
        with timer("score"):
            scores = score(ctx, records, rollouts, stream)
        rounds += 1
        failures, timeouts = failures + scores.failures, timeouts + scores.timeouts
        tests = {k: tests.get(k, 0) + v for k, v in scores.code_tests.items()}
        if not a.dynamic_sampling:
            return Generated(records, rollouts, scores)
        varied = varied_groups(scores.total, torch.tensor(rollouts.group_index), len(batch))
        if rounds == 1:
            varied_share = float(varied.float().mean())
        for g in range(len(batch)):  # the engine returns each prompt's responses together
            rows = list(range(g * a.group_size, (g + 1) * a.group_size))
            (kept if varied[g] and len(kept) < target else spare).append(_select(records, rollouts, scores, rows))
        need = int(dp_max([target - len(kept)])[0])  # all ranks run the same rounds
        if need == 0 or rounds > a.max_extra_rounds:
            break
        batch = ctx.sampler.more(need)
    groups = (kept + spare)[:target]  # short of varied groups: equal-reward ones (advantage 0) fill up
    records, rollouts, scores = _concat(groups)
    scores.failures, scores.timeouts, scores.code_tests = failures, timeouts, tests
    return Generated(records, rollouts, scores, rounds=rounds, varied_share=varied_share)


def from_workers(ctx: RLContext, step: int):
    """This rank's share of the step's groups from the asynchronous rollout workers, and the staleness
    metrics."""
    records, rollouts, total, components, failures, timeouts, tests, metrics = ctx.async_rollout.next_batch(step)
    return Generated(records, rollouts, Scores(total, components, failures, timeouts, tests)), metrics


def _select(records, rollouts: Rollouts, scores: Scores, rows: List[int]):
    idx = torch.tensor(rows)
    return ([records[i] for i in rows], rollouts.select(rows),
            Scores(scores.total[idx], {k: v[idx] for k, v in scores.components.items()}))


def _concat(groups):
    records = [r for g in groups for r in g[0]]
    rollouts = Rollouts.concat([g[1] for g in groups])
    names = groups[0][2].components.keys()
    scores = Scores(torch.cat([g[2].total for g in groups]),
                    {k: torch.cat([g[2].components[k] for g in groups]) for k in names})
    return records, rollouts, scores


# -- advantages, log-probs, update -------------------------------------------------------------

def advantages(ctx: RLContext, gen: Generated) -> torch.Tensor:
    """Per-row advantages of the groups (the CUDA kernel on a GPU, the PyTorch definition elsewhere)."""
    a = ctx.cfg.algorithm
    if a.opd is not None and not a.opd.reward_weight:  # distillation alone: the teacher's tokens are the signal
        return torch.zeros(len(gen.rollouts))
    # float64 on the PyTorch path: in float32 the mean of equal rewards is off by an ulp, which
    # eps alone would amplify (the kernel accumulates in float64)
    device = current_device()
    rewards = gen.scores.total.double().to(device)
    offsets = group_offsets(torch.tensor(gen.rollouts.group_index, device=device))
    return advantages_by_offsets(rewards, offsets, a.advantage, a.std, a.adv_eps).float().cpu()


def advantages_by_offsets(rewards: torch.Tensor, offsets: torch.Tensor, mode: str = "grpo",
                          std: str = "sample", eps: float = 1e-6) -> torch.Tensor:
    """Advantage [B] of each row; groups are rows [offsets[g], offsets[g + 1])."""
    counts = offsets[1:] - offsets[:-1]
    index = torch.repeat_interleave(torch.arange(len(counts), device=rewards.device), counts)
    definition = partial(group_advantages, group_index=index, mode=mode, std=std, eps=eps)
    out = kernel_group_advantages(rewards, offsets, mode, std, eps, lambda: definition(rewards.double()))
    return out if out is not None else definition(rewards)


def update(ctx: RLContext, batch: StepBatch, step: int) -> Dict[str, float]:
    """ppo_epochs passes over the rows, each in `minibatches` optimizer steps; mean statistics."""
    a, r = ctx.cfg.algorithm, ctx.cfg.rollout
    stats: Dict[str, float] = {}
    layout = {"positions": 0.0, "real": 0.0, "min": float("inf"), "max": 0.0}
    updates, hist = 0, empty_histogram()
    for epoch in range(a.ppo_epochs):
        seed = ctx.cfg.trainer.seed * 7919 + step * 31 + epoch
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed)).tolist()
        for part in range(a.minibatches):
            rows = order[part::a.minibatches]
            tokens, seqs = dp_sum([batch.response_tokens(rows), len(rows)])
            settings = LossSettings(a, a.norm_length or r.max_new_tokens, ctx.temperature, tokens, seqs)
            micro = micro_batches(ctx.cfg, batch, rows)
            out, minibatch_hist = train_minibatch(ctx, micro, settings)
            hist = hist + minibatch_hist  # quantiles over the step's tokens, not a mean of minibatches'
            ctx.weights_version += 1
            updates += 1
            for k, v in out.items():
                stats[k] = stats.get(k, 0.0) + v
            mine = layout_stats(batch, micro)
            layout = {"positions": layout["positions"] + mine["positions"], "real": layout["real"] + mine["real"],
                      "min": min(layout["min"], mine["min"]), "max": max(layout["max"], mine["max"])}
    return {**{k: v / updates for k, v in stats.items()}, **ratio_quantiles(hist), **batch_metrics(layout)}


def batch_metrics(layout: Dict[str, float]) -> Dict[str, float]:
    """The update's micro-batch layout over all data-parallel ranks: the share of model positions
    spent on padding, and the fewest and most real tokens in one micro-batch."""
    positions, real = dp_sum([layout["positions"], layout["real"]])
    fewest, most = dp_max([-layout["min"], layout["max"]])
    return {"batch/padding_share": 1.0 - real / max(positions, 1.0), "batch/tokens_per_microbatch_min": -fewest,
            "batch/tokens_per_microbatch_max": most}


def train_minibatch(ctx: RLContext, micro: List[MicroBatch], settings: LossSettings):
    """Forward/backward with the policy loss over this rank's micro-batches, one optimizer step: its
    statistics, and its histogram of the off-policy ratio."""
    # megatron divides each micro-batch loss by the local micro-batch count and averages gradients
    # over data-parallel ranks; the loss carries global denominators, so `scale` undoes both. (Over
    # context-parallel ranks, which each compute the loss of whole rows from their part of the
    # tokens, megatron's schedule multiplies the loss by cp, and the average divides it again.)
    scale = float(len(micro) * ps.get_data_parallel_world_size())
    out, grad_norm, update_ok = train_step(ctx.ddp_chunks, ctx.optimizer, ctx.scheduler, micro,
                                           partial(policy_loss, s=settings, scale=scale),
                                           mtp_token_weight=scale / max(settings.num_tokens, 1.0))
    stats, hist = reduce_stats(out)
    if settings.algo.opd is None:
        stats.pop("opd/reverse_kl")
    out = {**stats, "grad_norm": grad_norm, "update_skipped": float(not update_ok), **mtp_metrics(ctx.ddp_chunks)}
    return out, hist


# -- metrics ------------------------------------------------------------------------------------

def rollout_metrics(ctx: RLContext, gen: Generated, adv: torch.Tensor) -> Dict[str, float]:
    """Reward (total and per component), accuracy, lengths, truncation: means over all ranks' rows."""
    s, lengths = gen.scores, torch.tensor(gen.rollouts.response_lengths, dtype=torch.float64)
    truncated = sum(r == "length" for r in gen.rollouts.finish_reasons)
    names, counted = list(s.components), code_outcomes(ctx)
    sums = dp_sum([float(s.total.sum()), *[float(s.components[k].sum()) for k in names],
                   float(lengths.sum()), float(truncated), float(len(lengths)), float(s.failures),
                   float(s.timeouts), float(adv.abs().sum()), float(gen.varied_share), 1.0,
                   *[float(s.code_tests.get(k, 0)) for k in counted]])
    longest = dp_max([float(lengths.max()) if len(lengths) else 0.0])[0]
    n = max(sums[len(names) + 3], 1.0)
    out = {"reward/mean": sums[0] / n}
    out.update({f"reward/{k}": sums[1 + i] / n for i, k in enumerate(names)})
    base = len(names) + 1
    out.update({
        "response/length_mean": sums[base] / n,
        "response/length_max": longest,
        "response/tokens": sums[base],
        "response/truncated_share": sums[base + 1] / n,
        "reward/failures": sums[base + 3],
        "reward/timeouts": sums[base + 4],
        "advantage/abs_mean": sums[base + 5] / n,
        "rollout/varied_group_share": sums[base + 6] / sums[base + 7],
        "rollout/rounds": float(gen.rounds),
    })
    # programs' tests by how they ended, over all ranks (no_code: responses without a code block)
    out.update({f"reward/code_{k}": sums[base + 8 + i] for i, k in enumerate(counted)})
    if ctx.teacher is not None:  # the distillation teacher scores every response token
        out["opd/teacher_tokens"] = out["response/tokens"]
    return out


def throughput(gen: Generated, seconds: float) -> Dict[str, float]:
    """Tokens (prompt + response) and samples per second of this step, over all data-parallel ranks."""
    tokens = sum(len(p) + len(r) for p, r in zip(gen.rollouts.prompt_ids, gen.rollouts.response_ids))
    tokens, samples = dp_sum([float(tokens), float(len(gen.rollouts))])
    return {"perf/tokens_per_s": tokens / seconds, "perf/samples_per_s": samples / seconds, "time/step": seconds}
