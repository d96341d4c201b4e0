"""Per-token KL penalty estimators between the policy and a reference policy (Schulman's k1/k2/k3)."""

from __future__ import annotations

from typing import Literal

import torch

from r1mega.platform.torch_compat import clamp

KLEstimator = Literal["k1", "k2", "k3"]

# exp(20) ~ 5e8 keeps k3 finite in fp32 (exp overflows past ~88) while leaving every log-ratio
# a trained policy should reach untouched; beyond it k3's gradient is cut to 0.
K3_LOG_RATIO_BOUND = 20.0


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
        log_rho = clamp(-diff, -K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return log_rho.exp() - log_rho - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")
