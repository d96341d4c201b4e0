"""The phases of one RL step: weight sync, generate, score, advantages, log-probs, update.

Every rank of a model-parallel group (TP x PP) holds the same prompts and rollouts; ranks of
different data-parallel groups hold different ones. Rewards are computed once per
model-parallel group and broadcast, so all its ranks train on identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.ops.advantage import group_advantage, group_offsets
from r1mega.algorithms.filtering import varied_groups
from r1mega.platform.distributed import current_device
from r1mega.platform.fp8 import sequence_multiple
from r1mega.rewards.stack import RewardInput
from r1mega.data.packing import split_rows
from r1mega.rollout.types import Rollouts
from r1mega.trainer.rl_batch import StepBatch, collate, response_values
from r1mega.trainer.rl_forward import LossSettings, forward_logprobs, train_minibatch
from r1mega.trainer.rl_context import RLContext
from r1mega.trainer.schedule import dp_sum
from r1mega.trainer.timing import PhaseTimer


@dataclass
class Scores:
    total: torch.Tensor  # [N]
    components: Dict[str, torch.Tensor]  # name -> [N], unweighted
    failures: int = 0
    timeouts: int = 0


@dataclass
class Generated:
    records: list  # the prompt record of each row
    rollouts: Rollouts
    scores: Scores
    rounds: int = 1  # generation rounds (dynamic sampling adds some)
    varied_share: float = 1.0  # share of first-round groups whose rewards differ


def mp_broadcast(t: torch.Tensor) -> torch.Tensor:
    """Broadcast from the first rank of this model-parallel group to the rest of it."""
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return t
    out = t.to(current_device())
    dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
    return out.cpu()


# -- generate and score ----------------------------------------------------------------------

def score(ctx: RLContext, records: list, rollouts: Rollouts) -> Scores:
    """Rewards of every row, computed on the group's first rank and shared with the others."""
    names = ctx.reward_names
    packed = torch.zeros(len(names) + 1, len(rollouts) + 1, dtype=torch.float64)
    if ctx.rewards is not None:
        inputs = [RewardInput(response=ctx.tokenizer.decode(ids, skip_special_tokens=True), answer=rec.answer,
                              data_source=rec.data_source, metadata=rec.metadata, response_tokens=len(ids),
                              truncated=reason == "length")
                  for rec, ids, reason in zip(records, rollouts.response_ids, rollouts.finish_reasons)]
        result = ctx.rewards.score(inputs)
        packed[0, :-1] = torch.tensor(result.total, dtype=torch.float64)
        for i, name in enumerate(names):
            packed[i + 1, :-1] = torch.tensor(result.components[name], dtype=torch.float64)
        packed[0, -1], packed[1, -1] = result.failures, result.timeouts
    packed = mp_broadcast(packed)
    comps = {name: packed[i + 1, :-1] for i, name in enumerate(names)}
    return Scores(packed[0, :-1], comps, int(packed[0, -1]), int(packed[1, -1]))


def generate_and_score(ctx: RLContext, prompts: list, timer: PhaseTimer) -> Generated:
    """n responses per prompt, scored; with dynamic sampling, groups of equal rewards are
    replaced by new prompts' groups for up to max_extra_rounds more rounds (DAPO)."""
    a = ctx.cfg.algorithm
    target = len(prompts)
    kept, spare = [], []  # (records, rollouts, scores) of single groups
    batch, rounds, varied_share, failures, timeouts = prompts, 0, 1.0, 0, 0
    while True:
        with timer("generate"):
            rollouts = ctx.engine.generate([ctx.prompt_ids(r) for r in batch], ctx.sampling, n=a.group_size)
        records = [batch[g] for g in rollouts.group_index]
        with timer("score"):
            scores = score(ctx, records, rollouts)
        rounds += 1
        failures, timeouts = failures + scores.failures, timeouts + scores.timeouts
        if not a.dynamic_sampling:
            return Generated(records, rollouts, scores)
        varied = varied_groups(scores.total, torch.tensor(rollouts.group_index), len(batch))
        if rounds == 1:
            varied_share = float(varied.float().mean())
        for g in range(len(batch)):  # the engine returns each prompt's responses together
            rows = list(range(g * a.group_size, (g + 1) * a.group_size))
            (kept if varied[g] and len(kept) < target else spare).append(_select(records, rollouts, scores, rows))
        need = int(dp_sum([target - len(kept)], op=dist.ReduceOp.MAX)[0])  # all ranks run the same rounds
        if need == 0 or rounds > a.max_extra_rounds:
            break
        batch = ctx.sampler.more(need)
    groups = (kept + spare)[:target]  # short of varied groups: equal-reward ones (advantage 0) fill up
    records, rollouts, scores = _concat(groups)
    scores.failures, scores.timeouts = failures, timeouts
    return Generated(records, rollouts, scores, rounds=rounds, varied_share=varied_share)


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
    """Per-row advantages through r1mega.ops (the CUDA kernel on a GPU, the reference elsewhere)."""
    a = ctx.cfg.algorithm
    # float64 on the reference path: in float32 the mean of equal rewards is off by an ulp, which
    # eps alone would amplify (the kernel accumulates in float64)
    device = current_device()
    rewards = gen.scores.total.double().to(device)
    offsets = group_offsets(torch.tensor(gen.rollouts.group_index, device=device))
    return group_advantage(rewards, offsets, a.advantage, a.std, a.adv_eps).float().cpu()


def _micro_batches(ctx: RLContext, batch: StepBatch, rows: List[int]):
    """Micro-batches of `rows` under the token budget; as many on every data-parallel rank."""
    lengths = [len(t) - 1 for t in batch.tokens]
    parts = split_rows(lengths, rows, ctx.cfg.trainer.micro_batch_tokens)
    count = int(dp_sum([len(parts)], op=dist.ReduceOp.MAX)[0])
    if count != len(parts):
        parts = split_rows(lengths, rows, ctx.cfg.trainer.micro_batch_tokens, min_parts=count)
    multiple = sequence_multiple(ctx.cfg.model.fp8, ctx.cfg.parallel)  # sequence parallelism, FP8 shapes
    return [collate(batch, p, multiple) for p in parts]


def needs_old_logprobs(a) -> bool:
    """Whether the update needs the old policy's log-probs recomputed: it runs off-policy (more
    than one optimizer step per batch) and does not take the engine's."""
    return not a.use_rollout_logprobs and (a.ppo_epochs > 1 or a.minibatches > 1)


def logprobs(ctx: RLContext, batch: StepBatch) -> None:
    """Fill batch.old_logp (when the update needs them) and batch.ref_logp (when KL is on)."""
    a = ctx.cfg.algorithm
    if a.use_rollout_logprobs:
        batch.old_logp = batch.rollout_logp
    need_old = needs_old_logprobs(a)
    if not need_old and ctx.ref_chunks is None:
        return
    micro = _micro_batches(ctx, batch, list(range(len(batch))))
    if need_old:
        batch.old_logp = _per_row(len(batch), micro, forward_logprobs(ctx.ddp_chunks, micro, ctx.temperature))
    if ctx.ref_chunks is not None:
        batch.ref_logp = _per_row(len(batch), micro, forward_logprobs(ctx.ref_chunks, micro, ctx.temperature))


def _per_row(n: int, micro, values) -> Optional[List[torch.Tensor]]:
    if values is None:  # not the last pipeline stage: the loss never runs here
        return None
    out: List[Optional[torch.Tensor]] = [None] * n
    for m, v in zip(micro, values):
        for row, vals in zip(m.rows, response_values(m, v)):
            out[row] = vals
    return out


def update(ctx: RLContext, batch: StepBatch, step: int) -> Dict[str, float]:
    """ppo_epochs passes over the rows, each in `minibatches` optimizer steps; mean statistics."""
    a, r = ctx.cfg.algorithm, ctx.cfg.rollout
    stats: Dict[str, float] = {}
    updates = 0
    for epoch in range(a.ppo_epochs):
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(ctx.cfg.trainer.seed * 7919 + step
                                                                                     * 31 + epoch)).tolist()
        for part in range(a.minibatches):
            rows = order[part::a.minibatches]
            tokens, seqs = dp_sum([batch.response_tokens(rows), len(rows)])
            settings = LossSettings(a, a.norm_length or r.max_new_tokens, ctx.temperature, tokens, seqs)
            out = train_minibatch(ctx.ddp_chunks, ctx.optimizer, ctx.scheduler,
                                  _micro_batches(ctx, batch, rows), settings)
            ctx.weights_version += 1
            updates += 1
            for k, v in out.items():
                stats[k] = stats.get(k, 0.0) + v
    return {k: v / updates for k, v in stats.items()}


def rollout_turn(ctx: RLContext) -> Dict[str, float]:
    """Hand the GPUs and the updated weights to an engine that keeps its own copy (SGLang): the
    trainer frees grads and offloads optimizer states, the engine takes its weights back, the
    weights cross in buckets, then the engine takes its KV cache and CUDA graphs back.
    Nothing to do for the native engine, which decodes with the policy's own parameters."""
    if ctx.engine_shares_weights:
        return {}
    from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors

    if ctx.train_state is not None:
        ctx.train_state.offload_training()
    ctx.engine.resume_memory(["weights"])
    # the engine needs them after an optimizer step, and after a release that threw its copy away
    # (SGLang without --enable-weights-cpu-backup: also after an evaluation)
    stale = ctx.synced_version != ctx.weights_version or ctx.engine.weights_lost
    if stale:
        if ctx.hf_plan is None:
            ctx.hf_plan = make_plan(ctx.chunks, ctx.cfg.model)
        ctx.engine.sync_weights(world_hf_tensors(ctx.chunks, ctx.cfg.model, ctx.hf_plan))
        ctx.synced_version = ctx.weights_version
    if ctx.train_state is not None:
        ctx.train_state.offload_parameters()
    ctx.engine.resume_memory(["kv_cache", "cuda_graph"])
    return dict(ctx.engine.last_sync) if stale else {}


def training_turn(ctx: RLContext) -> None:
    """Take the GPUs back from a colocated engine: it releases everything, the trainer reloads."""
    if ctx.train_state is None:
        return
    ctx.engine.release_memory()
    ctx.train_state.reload()
