"""Corrections for tokens sampled by another policy than the one the PPO ratio starts from.

Three policies take part. The behaviour policy mu sampled the tokens: the rollout engine's
log-probs, computed by other kernels (another numeric policy) and, with asynchronous rollouts, by
older weights. The proximal policy pi_prox is the trust region's centre: the trainer's log-probs
before the update. The policy pi_theta is being trained. The surrogate clips r = pi_theta / pi_prox;
each token's term is then weighted by a function of rho = pi_prox / mu (AReaL's decoupled PPO):

- weight (`token`, `sequence`, `geometric`): rho_t, the response's product prod_t rho_t, or its
  geometric mean, truncated at `weight_cap`. Token level with cap 2 is truncated importance
  sampling (TIS).
- reject (`token`, `sequence`, `geometric`): tokens, or whole responses, whose rho at that level
  lies outside [reject_low, reject_high] get weight 0. That is masked importance sampling (MIS);
  token weights with token rejection outside [0.5, 5] is IcePop; token weights with token rejection
  above 5 is AReaL's decoupled PPO.
- veto: a response holding a token with rho_t < veto is rejected whole (a token the engine found
  far likelier than the trainer does: a numerical failure rather than a policy difference).

Rejected tokens keep their place in the loss's denominators, as in AReaL: each aggregation mode
keeps its definition whatever is masked, and the step shrinks with the rejected share (verl and
slime instead take rejected tokens out of the denominators). Everything here is detached: the
weights multiply the per-token policy-gradient term and carry no gradient. A non-finite ratio on
the mask (a NaN log-prob) counts as the largest there is, so a rejection band drops it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from r1mega.algorithms.policy_loss import LOG_RATIO_BOUND, _zeros_off
from r1mega.config.choices import CorrectionLevel

# Histogram of log rho for the ratio quantiles: bins of 0.002 in log space over [-2, 2] (0.2% in
# the ratio near 1, where a healthy run's ratios lie), one centred on rho = 1 exactly, and one bin
# each for everything beyond.
HIST_BOUND = 2.0
HIST_BINS = 2001
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def log_rho(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_prox / mu per token [B, T] (detached, bounded), 0 off the mask."""
    m = mask.bool()
    diff = torch.nan_to_num((prox_logp - behav_logp).detach(), nan=LOG_RATIO_BOUND)
    return _zeros_off(m, diff).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def at_level(log_ratio: torch.Tensor, mask: torch.Tensor, level: CorrectionLevel) -> torch.Tensor:
    """log rho at a level, per token [B, T]: the token's, its response's sum (the log of the product
    of ratios), or that sum over the response's length (the log of the geometric mean)."""
    if level == "token":
        return log_ratio
    m = mask.bool()
    total = log_ratio.sum(-1, keepdim=True)
    if level == "geometric":
        total = total / m.sum(-1, keepdim=True).clamp(min=1)
    elif level != "sequence":
        raise ValueError(f"correction level must be token, sequence or geometric, got {level!r}")
    return total.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).expand_as(log_ratio)


def correction_weights(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, *,
                       weight: Optional[CorrectionLevel] = None, weight_cap: Optional[float] = None,
                       reject: Optional[CorrectionLevel] = None, reject_low: Optional[float] = None,
                       reject_high: Optional[float] = None, veto: Optional[float] = None,
                       ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """Per-token weights [B, T] of the policy-gradient term (None when no correction is set; 0 off
    the mask and where rejected) and counts over the mask: `rejected` tokens, `rejected_rows`
    (responses with every token rejected), `truncated` tokens (weight at the cap), `weight` (the
    weights' sum)."""
    m = mask.bool()
    lr = log_rho(prox_logp, behav_logp, m)
    w = torch.ones_like(lr)
    truncated = torch.zeros_like(m)
    if weight is not None:
        w = at_level(lr, m, weight).exp()
        if weight_cap is not None:
            truncated = w > weight_cap
            w = w.clamp(max=weight_cap)
    keep = m.clone()
    if reject is not None:
        level = at_level(lr, m, reject)
        if reject_low is not None:
            keep &= level >= math.log(reject_low)
        if reject_high is not None:
            keep &= level <= math.log(reject_high)
    if veto is not None:
        keep &= ~((lr < math.log(veto)) & m).any(-1, keepdim=True)
    out = _zeros_off(keep, w)
    rejected = m & ~keep
    counts = {"rejected": rejected.sum(), "rejected_rows": (m.any(-1) & ~keep.any(-1)).sum(),
              "truncated": (truncated & keep).sum(), "weight": out.sum()}
    applied = weight is not None or reject is not None or veto is not None
    return (out if applied else None), {k: v.double() for k, v in counts.items()}


def empty_histogram() -> torch.Tensor:
    """A ratio_histogram of no tokens."""
    return torch.zeros(HIST_BINS + 2, dtype=torch.float64)


def ratio_histogram(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Counts of log rho over the mask in HIST_BINS bins over [-HIST_BOUND, HIST_BOUND] plus one
    below and one above: [HIST_BINS + 2] float64, summable over micro-batches and ranks."""
    values = log_ratio[mask.bool()].double()
    width = 2 * HIST_BOUND / HIST_BINS
    index = torch.floor((values + HIST_BOUND) / width).clamp(-1, HIST_BINS).long() + 1
    return torch.bincount(index, minlength=HIST_BINS + 2).double()


def histogram_quantiles(counts: torch.Tensor, qs: Sequence[float] = QUANTILES) -> Dict[float, float]:
    """The ratio rho at each quantile of a ratio_histogram (its bin's centre; the bound itself for
    the outer bins); NaN when the histogram is empty."""
    total = float(counts.sum())
    if total == 0:
        return {q: float("nan") for q in qs}
    cumulative = torch.cumsum(counts.double(), 0)
    width = 2 * HIST_BOUND / HIST_BINS
    out = {}
    for q in qs:
        b = int(torch.searchsorted(cumulative, torch.tensor(q * total, dtype=torch.float64)).clamp(max=HIST_BINS + 1))
        if b == 0:
            log_value = -HIST_BOUND
        elif b == HIST_BINS + 1:
            log_value = HIST_BOUND
        else:
            log_value = -HIST_BOUND + (b - 0.5) * width
        out[q] = math.exp(log_value)
    return out
