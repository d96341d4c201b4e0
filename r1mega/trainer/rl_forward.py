"""Forward passes of the RL step through megatron's pipeline schedules.

`forward_logprobs` gives per-token log-probs (old policy, reference) without gradients;
`train_minibatch` runs forward/backward with the GRPO-family loss and one optimizer step.
Log-probs come from vocab-parallel logits: each tensor-parallel rank keeps its vocab slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.algorithms.aggregation import aggregate
from r1mega.algorithms.policy_loss import surrogate_stats, truncated_is_weights
from r1mega.config.schema import AlgorithmConfig
from r1mega.ops.grpo_loss import Surrogate, policy_terms
from r1mega.platform.distributed import current_device
from r1mega.trainer.rl_batch import MicroBatch
from r1mega.trainer.schedule import run_schedule, target_logprobs, train_step

# Sums reduced over data-parallel ranks and micro-batches (divided by `tokens` for means).
STAT_SUMS = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "ratio", "logprob_gap", "tokens")
STAT_MAXES = ("logprob_gap_max", "ratio_max")


@dataclass(frozen=True)
class LossSettings:
    """The algorithm config plus what one minibatch's loss needs besides it."""

    algo: AlgorithmConfig
    norm_length: int  # seq-mean-token-sum-norm constant
    temperature: float  # of the rollouts, so of the log-probs
    num_tokens: float  # response tokens of the whole minibatch, all data-parallel ranks
    num_seqs: float


def forward_logprobs(chunks, micro_batches: List[MicroBatch], temperature: float) -> Optional[List[torch.Tensor]]:
    """Log-probs [b, L] per micro-batch on the last pipeline stage; None on other stages."""

    def collect(micro, logits):
        logp, _ = target_logprobs(logits, micro.targets, temperature, with_entropy=False)
        return logits.new_zeros(()), {"logp": logp.detach().float().cpu()}

    with torch.no_grad():
        out = run_schedule(chunks, micro_batches, collect, forward_only=True)
    return [o["logp"] for o in out] if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def policy_loss(micro: MicroBatch, logits: torch.Tensor, s: LossSettings, scale: float):
    """GRPO-family loss of one micro-batch (pure math on its tensors) and its statistics."""
    a = s.algo
    logp, entropy = target_logprobs(logits, micro.targets, s.temperature, with_entropy=True)
    mask = micro.mask
    old = micro.old_logp if micro.old_logp is not None else logp.detach()
    tis = truncated_is_weights(old, micro.rollout_logp, mask, a.tis_cap) if a.tis_cap is not None else None
    counts = dict(mode=a.loss_agg, num_tokens=s.num_tokens, num_seqs=s.num_seqs, norm_length=s.norm_length)
    terms = policy_terms(logp, old, micro.ref_logp, micro.advantages, mask, tis, surrogate(a), **counts)
    loss = terms.loss
    if a.entropy_coeff:
        loss = loss - a.entropy_coeff * aggregate(entropy, mask, **counts)
    pg_stats = surrogate_stats(terms.ratio, micro.advantages, mask, a.eps_low, a.eps_high, a.dual_clip)
    n = mask.sum().float()
    gap = torch.where(mask, (old - micro.rollout_logp).abs(), 0.0)
    zero = lambda x: torch.where(mask, x.detach(), 0.0).sum()  # noqa: E731
    sums = torch.stack([loss.detach(), aggregate(terms.pg, mask, **counts), zero(terms.kl), zero(entropy),
                        pg_stats["clip_fraction"] * n, pg_stats["ratio_mean"] * n, gap.sum(), n])
    maxes = torch.stack([gap.max() if mask.any() else gap.new_zeros(()), pg_stats["ratio_max"]])
    # megatron divides each micro-batch loss by the local micro-batch count and averages
    # gradients over data-parallel ranks; the loss already carries global denominators.
    return loss * scale, {"sums": sums.double().cpu(), "maxes": maxes.double().cpu()}


def surrogate(a: AlgorithmConfig) -> Surrogate:
    return Surrogate(a.eps_low, a.eps_high, a.dual_clip, a.ratio_level, a.kl_beta, a.kl_estimator)


def train_minibatch(ddp_chunks, optimizer, scheduler, micro_batches: List[MicroBatch],
                    settings: LossSettings) -> Dict[str, float]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step."""
    scale = float(len(micro_batches) * ps.get_data_parallel_world_size())
    out, grad_norm, update_ok = train_step(ddp_chunks, optimizer, scheduler, micro_batches,
                                           partial(policy_loss, s=settings, scale=scale))
    stats = _reduce_stats(out)
    stats["grad_norm"] = grad_norm
    stats["update_skipped"] = float(not update_ok)
    return stats


def _reduce_stats(outputs: List[dict]) -> Dict[str, float]:
    """Means over the minibatch's response tokens, the same on every rank."""
    sums = torch.zeros(len(STAT_SUMS), dtype=torch.float64)
    maxes = torch.zeros(len(STAT_MAXES), dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for o in outputs:
            sums += o["sums"]
            maxes = torch.maximum(maxes, o["maxes"])
    sums, maxes = sums.to(current_device()), maxes.to(current_device())
    for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sums, maxes = sums.cpu(), maxes.cpu()
    tokens = max(float(sums[-1]), 1.0)
    stats = {name: float(v) / tokens for name, v in zip(STAT_SUMS[2:-1], sums[2:-1])}
    # loss and pg_loss carry global denominators already: summing over micro-batches and ranks
    # gives the minibatch value
    stats.update(loss=float(sums[0]), pg_loss=float(sums[1]))
    stats.update({name: float(v) for name, v in zip(STAT_MAXES, maxes)})
    return stats
