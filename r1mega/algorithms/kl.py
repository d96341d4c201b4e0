"""Per-token KL penalty estimators between the policy and a reference policy (Schulman's k1/k2/k3)."""

from __future__ import annotations

import torch

from r1mega.algorithms.policy_loss import LOG_RATIO_BOUND
from r1mega.config.choices import KLEstimator
from r1mega.platform.torch_compat import clamp


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate [B, T] of KL(pi || ref) from samples of pi; 0 where mask is False.

    With log rho = ref_logp - logp: k1 = -log rho, k2 = (log rho)^2 / 2,
    k3 = rho - log rho - 1 (>= 0; GRPO's choice), its log-ratio clamped to +-20.
    """
    diff = logp - ref_logp
    if mask is not None:
        # where, not a product: padded positions may hold -inf/garbage log-probs.
        diff = torch.where(mask.bool(), diff, torch.zeros_like(diff))
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        log_rho = clamp(-diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # past it, k3's gradient is cut to 0
        return log_rho.exp() - log_rho - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")
