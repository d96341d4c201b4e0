"""PPO/GRPO clipped surrogate (clip-higher, dual clip, GSPO sequence ratios) and the rollout log-prob gap."""

from __future__ import annotations

import torch

from r1mega.algorithms.advantages import broadcast_to_tokens
from r1mega.config.choices import RatioLevel
from r1mega.platform.torch_compat import clamp

# exp(20) ~ 5e8: keeps ratios (and the KL estimators' exp) finite in fp32, so a zero gradient times
# an inf ratio never makes NaN. Any ratio this far from 1 is clipped (or dual-clipped) anyway, and
# no log-ratio a trained policy should reach is touched.
LOG_RATIO_BOUND = 20.0


def _zeros_off(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x on the mask, exactly 0 elsewhere (where, not a product: off-mask values may be inf/NaN)."""
    return torch.where(mask, x, torch.zeros_like(x))


def token_advantages(advantages: torch.Tensor, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] advantages as [B, T] in like's dtype, 0 off the mask."""
    adv = advantages.to(like.dtype)
    return broadcast_to_tokens(adv, m) if adv.dim() == 1 else _zeros_off(m, adv)


def _masked_stats(x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached mean / max / min of x over the mask; all 0 when the mask is empty."""
    x = x.detach()
    count = mask.sum()
    empty = count == 0
    zero = x.new_zeros(())
    mean = _zeros_off(mask, x).sum() / count.clamp(min=1)
    hi = torch.where(mask, x, x.new_tensor(float("-inf"))).amax() if x.numel() else zero
    lo = torch.where(mask, x, x.new_tensor(float("inf"))).amin() if x.numel() else zero
    return {"mean": mean, "max": torch.where(empty, zero, hi), "min": torch.where(empty, zero, lo)}


def _masked_fraction(flag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of masked tokens where flag holds (detached)."""
    return (flag & mask).sum().float() / mask.sum().clamp(min=1).float()


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
              ratio_level: RatioLevel = "token") -> torch.Tensor:
    """log pi/pi_old per token [B, T], or GSPO's per-token straight-through form of the sequence ratio.

    Sequence level: log s_i = mean over the response of log pi/pi_old, and the token value is
    sg[log s_i] + log pi_t - sg[log pi_t]: equal to log s_i, with gradient d/dlogp_t = 1, so each
    token's gradient carries its sequence weight s_i (GSPO-token with a shared advantage).
    """
    token = _zeros_off(mask, logp - old_logp)
    if ratio_level == "token":
        return clamp(token, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if ratio_level != "sequence":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    seq = token.sum(-1) / mask.sum(-1).clamp(min=1).to(token.dtype)
    seq = seq.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    live = _zeros_off(mask, logp)
    return _zeros_off(mask, seq.detach().unsqueeze(-1) + live - live.detach())


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None = None,
                      ratio_level: RatioLevel = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) [B, T], 0 off the mask, and stats
    (see surrogate_and_ratio)."""
    loss, ratio = surrogate_and_ratio(logp, old_logp, advantages, mask, eps_low, eps_high, dual_clip, ratio_level)
    return loss, surrogate_stats(ratio, advantages, mask, eps_low, eps_high, dual_clip)


def surrogate_and_ratio(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None = None,
                        ratio_level: RatioLevel = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped-surrogate loss [B, T] (0 off the mask) and the ratio rho [B, T] (detached; 1
    off the mask), from which surrogate_stats reads the clip statistics.

    dual_clip = c > 1 caps the loss of negative-advantage tokens at -c A (dual-clip PPO).
    ratio_level="sequence" uses GSPO's length-normalised sequence ratio (give it GSPO's tiny eps).
    advantages may be [B] (shared by the response) or [B, T].
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.bool()
    adv = token_advantages(advantages, m, logp)
    ratio = log_ratio(logp, old_logp, m, ratio_level).exp()
    clipped = clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return _zeros_off(m, loss), ratio.detach()


def surrogate_stats(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float,
                    eps_high: float, dual_clip: float | None) -> dict[str, torch.Tensor]:
    """Clip fractions (tokens whose gradient the clip removes) and ratio summary over the mask;
    advantages [B] or [B, T]."""
    m = mask.bool()
    adv = token_advantages(advantages, m, ratio)
    ratio = ratio.detach()
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    dual = (ratio > dual_clip) & (adv < 0) if dual_clip is not None else torch.zeros_like(m)
    ratio_stats = _masked_stats(ratio, m)
    return {
        "clip_fraction": _masked_fraction(low | high, m),
        "clip_fraction_low": _masked_fraction(low, m),
        "clip_fraction_high": _masked_fraction(high, m),
        "dual_clip_fraction": _masked_fraction(dual, m),
        "ratio_mean": ratio_stats["mean"],
        "ratio_max": ratio_stats["max"],
        "ratio_min": ratio_stats["min"],
    }


def logprob_gap_stats(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and max |trainer - rollout| log-prob over the mask (detached; 0 when empty)."""
    m = mask.bool()
    gap = _zeros_off(m, (trainer_logp - rollout_logp).detach()).abs()
    stats = _masked_stats(gap, m)
    return {"logprob_gap_mean": stats["mean"], "logprob_gap_max": stats["max"]}
