"""The GRPO-family loss of one micro-batch, and the statistics the step reports from it.

From this rank's vocab slice of the logits: the sampled tokens' log-probs and entropy
(r1mega.ops.logprobs), the clipped surrogate against the old policy times the TIS weight, the KL
estimate against the KL reference model, aggregated with whole-minibatch denominators, minus the
entropy bonus. The per-token terms run in one fused CUDA kernel (r1mega.ops.grpo_loss) where it
runs and agreed with the PyTorch definitions of r1mega.algorithms, and as those definitions
elsewhere; either way the ratio comes out once and the clip statistics are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from r1mega.algorithms.aggregation import aggregate, token_weights
from r1mega.algorithms.distill import opd_advantages, reverse_kl, topk_reverse_kl
from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.off_policy import (QUANTILES, correction_weights, empty_histogram, histogram_quantiles,
                                          log_rho, ratio_histogram)
from r1mega.algorithms.policy_loss import logprob_gap_stats, surrogate_and_ratio, surrogate_stats, token_advantages
from r1mega.config.schema import AlgorithmConfig, CorrectionConfig
from r1mega.ops import grpo_loss as kernel
from r1mega.ops.logprobs import candidate_logprobs, target_logprobs
from r1mega.platform.distributed import reduce_last_stage
from r1mega.trainer.rl.batch import MicroBatch

# Sums reduced over data-parallel ranks and micro-batches (divided by `tokens` for means).
STAT_SUMS = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "ratio", "logprob_gap", "off_policy/rejected_share",
             "off_policy/truncated_share", "off_policy/weight_mean", "opd/reverse_kl", "tokens")
STAT_MAXES = ("logprob_gap_max", "ratio_max")


@dataclass(frozen=True)
class Surrogate:
    """The per-token terms' settings: the algorithm config's part of the loss."""

    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    ratio_level: str  # "token" or "sequence" (GSPO)
    kl_beta: float
    kl_estimator: str

    @staticmethod
    def of(a: AlgorithmConfig) -> "Surrogate":
        return Surrogate(a.eps_low, a.eps_high, a.dual_clip, a.ratio_level, a.kl_beta, a.kl_estimator)


class PolicyTerms(NamedTuple):
    loss: torch.Tensor  # scalar: aggregate(pg + kl_beta * kl), differentiable in logp
    pg: torch.Tensor  # [B, T] surrogate times the TIS weight, 0 off the mask (detached)
    kl: torch.Tensor  # [B, T] KL estimate, 0 off the mask or when kl_beta is 0 (detached)
    ratio: torch.Tensor  # [B, T] pi / pi_old, 1 off the mask (detached)


@dataclass(frozen=True)
class LossSettings:
    """The algorithm config plus what one minibatch's loss needs besides it."""

    algo: AlgorithmConfig
    norm_length: int  # seq-mean-token-sum-norm constant
    temperature: float  # of the rollouts, so of the log-probs
    num_tokens: float  # response tokens of the whole minibatch, all data-parallel ranks
    num_seqs: float


def policy_loss(micro: MicroBatch, logits: torch.Tensor, s: LossSettings, scale: float):
    """(loss times `scale`, report) of one micro-batch: the loss function of megatron's schedule."""
    a = s.algo
    logp, entropy = target_logprobs(logits, micro.targets, s.temperature, with_entropy=True)
    logp, entropy = micro.per_row(logp), micro.per_row(entropy)  # a pack's response tokens, per row
    mask = micro.mask
    old = micro.old_logp if micro.old_logp is not None else logp.detach()  # the proximal policy
    weights, corrected = off_policy_weights(old, micro.rollout_logp, mask, a.correction)
    counts = dict(mode=a.loss_agg, num_tokens=s.num_tokens, num_seqs=s.num_seqs, norm_length=s.norm_length)
    advantages, distilled, distill_loss = micro.advantages, torch.zeros((), dtype=torch.float64), 0.0
    if a.opd is not None:  # on-policy distillation (r1mega.algorithms.distill)
        advantages, distilled, distill_loss = distillation(micro, logits, old, s, counts)
    terms = policy_terms(logp, old, micro.ref_logp, advantages, mask, weights, Surrogate.of(a), **counts)
    loss = terms.loss + distill_loss
    if a.entropy_coeff:
        loss = loss - a.entropy_coeff * aggregate(entropy, mask, **counts)
    clip = surrogate_stats(terms.ratio, advantages, mask, a.eps_low, a.eps_high, a.dual_clip)
    gap = logprob_gap_stats(old, micro.rollout_logp, mask)
    n = mask.sum().float()
    masked_sum = lambda x: torch.where(mask, x.detach(), 0.0).sum()  # noqa: E731
    sums = torch.stack([loss.detach(), aggregate(terms.pg, mask, **counts), masked_sum(terms.kl),
                        masked_sum(entropy), clip["clip_fraction"] * n, clip["ratio_mean"] * n,
                        gap["logprob_gap_mean"] * n, corrected["rejected"], corrected["truncated"],
                        corrected["weight"], distilled.to(n.device, n.dtype), n])
    maxes = torch.stack([gap["logprob_gap_max"], clip["ratio_max"]])
    rows = torch.stack([corrected["rejected_rows"], mask.any(-1).sum().double()])
    hist = ratio_histogram(log_rho(old, micro.rollout_logp, mask), mask)
    # megatron divides each micro-batch loss by the local micro-batch count and averages
    # gradients over data-parallel ranks; the loss already carries global denominators.
    return loss * scale, {"sums": sums.double().cpu(), "maxes": maxes.double().cpu(), "rows": rows.cpu(),
                          "ratio_hist": hist.cpu()}


def distillation(micro: MicroBatch, logits: torch.Tensor, old: torch.Tensor, s: LossSettings, counts: dict):
    """(advantages, summed per-token reverse KL, loss term) of on-policy distillation. Sampled tokens: each
    token's advantage is the teacher's log-prob of it minus the student's, plus the reward's share. Top-k:
    the reverse KL over the teacher's k best tokens and the rest is a loss of its own (its gradient reaches
    every candidate's logit, not just the sampled token's), and the advantages are the reward's share only."""
    o, mask = s.algo.opd, micro.mask
    if not o.top_k:
        advantages = opd_advantages(old, micro.teacher_logp, mask, o.kl_coef, o.kl_clip, micro.advantages,
                                    o.reward_weight)
        return advantages, reverse_kl(old, micro.teacher_logp, mask).detach().sum(), 0.0
    ids = micro.in_output_layout(micro.teacher_topk_ids)
    student = micro.per_row(candidate_logprobs(logits, ids, s.temperature))
    kl = topk_reverse_kl(student, micro.teacher_topk_logp, mask)
    advantages = opd_advantages(old, micro.teacher_logp, mask, 0.0, None, micro.advantages, o.reward_weight)
    return advantages, kl.detach().sum(), o.kl_coef * aggregate(kl, mask, **counts)


def off_policy_weights(prox_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       c: CorrectionConfig):
    """The configured corrections' weights of the policy-gradient term (None: none set) and counts."""
    return correction_weights(prox_logp, rollout_logp, mask, weight=c.weight, weight_cap=c.weight_cap,
                              reject=c.reject, reject_low=c.reject_low, reject_high=c.reject_high, veto=c.veto)


def policy_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                 advantages: torch.Tensor, mask: torch.Tensor, weights: Optional[torch.Tensor], s: Surrogate,
                 **counts) -> PolicyTerms:
    """The policy terms of [B, T] log-probs; advantages [B] or [B, T]; weights the detached off-policy
    weights of the surrogate (None: off); counts are aggregate()'s (mode, num_tokens, num_seqs, norm_length).

    The fused kernel computes token-level ratios only (GSPO's sequence ratio needs a reduction over
    each response first)."""
    mode = counts.get("mode", "token-mean")
    if s.ratio_level == "token" and kernel.runs_on(logp) and _kernel_trusted(s, mode, logp.device):
        return _fused_terms(logp, old_logp, ref_logp, advantages, mask, weights, s, counts)
    return pytorch_terms(logp, old_logp, ref_logp, advantages, mask, weights, s, counts)


def pytorch_terms(logp, old_logp, ref_logp, advantages, mask, weights, s: Surrogate, counts: dict) -> PolicyTerms:
    """The PyTorch definitions, differentiable through autograd: the kernel's oracle."""
    pg, ratio = surrogate_and_ratio(logp, old_logp, advantages, mask, s.eps_low, s.eps_high, s.dual_clip,
                                    s.ratio_level)
    if weights is not None:
        pg = pg * weights
    kl = kl_penalty(logp, ref_logp, s.kl_estimator, mask) if s.kl_beta > 0 else torch.zeros_like(logp)
    loss = aggregate(pg + s.kl_beta * kl, mask, **counts)
    return PolicyTerms(loss, pg.detach(), kl.detach(), ratio)


def _fused_terms(logp, old_logp, ref_logp, advantages, mask, weights, s: Surrogate, counts: dict) -> PolicyTerms:
    m = mask.bool()
    out = kernel.fused_token_loss(logp, old_logp, ref_logp, token_advantages(advantages, m, logp), m, weights,
                                  token_weights(m, **counts), s.eps_low, s.eps_high, s.dual_clip, s.kl_beta,
                                  s.kl_estimator)
    return PolicyTerms(*out[:4])


def _kernel_trusted(s: Surrogate, mode: str, device: torch.device) -> bool:
    """The kernel against pytorch_terms, values and gradients, on the kernel's check batch."""
    counts = {"mode": mode}

    def run(terms_of):
        def on(batch):
            leaf = batch["logp"].clone().requires_grad_(True)
            args = [batch[k] for k in ("old_logp", "ref_logp", "advantages", "mask", "tis")]
            with torch.enable_grad():
                terms = terms_of(leaf, *args, s, counts)
                (grad,) = torch.autograd.grad(terms.loss, leaf)
            values = torch.cat([terms.loss.detach().reshape(1), terms.pg.flatten(), terms.kl.flatten(),
                                terms.ratio.flatten()])
            return values, grad
        return on

    return kernel.trusted(f"grpo_token_loss[{s}, {mode}]", device, run(_fused_terms), run(pytorch_terms))


def reduce_stats(outputs: List[dict]) -> Tuple[Dict[str, float], torch.Tensor]:
    """The minibatch's statistics from the last stage's reports, the same on every rank: means over
    its response tokens, and maxima; and its histogram of rho (ratio_quantiles reads it)."""
    sums = torch.zeros(len(STAT_SUMS), dtype=torch.float64)
    maxes = torch.zeros(len(STAT_MAXES), dtype=torch.float64)
    rows, hist = torch.zeros(2, dtype=torch.float64), empty_histogram()  # zeros on other stages
    for o in outputs or []:
        sums += o["sums"]
        maxes = torch.maximum(maxes, o["maxes"])
        rows, hist = rows + o["rows"], hist + o["ratio_hist"]
    sums, rows, hist = (reduce_last_stage(x) for x in (sums, rows, hist))
    maxes = reduce_last_stage(maxes, op=dist.ReduceOp.MAX)
    tokens = max(float(sums[-1]), 1.0)
    stats = {name: float(v) / tokens for name, v in zip(STAT_SUMS[2:-1], sums[2:-1])}
    # loss and pg_loss carry global denominators already: summing over micro-batches and ranks
    # gives the minibatch value
    stats.update(loss=float(sums[0]), pg_loss=float(sums[1]))
    stats.update({name: float(v) for name, v in zip(STAT_MAXES, maxes)})
    stats["off_policy/rejected_row_share"] = float(rows[0]) / max(float(rows[1]), 1.0)
    return stats, hist


def ratio_quantiles(hist: torch.Tensor) -> Dict[str, float]:
    """Quantiles of rho = pi_prox / pi_rollout over the tokens of a summed ratio_histogram."""
    return {f"off_policy/ratio_p{round(100 * q):02d}": v for q, v in histogram_quantiles(hist, QUANTILES).items()}
