"""The fused per-token GRPO loss kernel (kernels/csrc/grpo_loss.cu) and its first-use check.

From flat per-token inputs, one kernel computes the clipped surrogate against the old policy
(times the TIS weight), the KL estimate against the KL reference policy, their weighted sum and
d loss / d logp, in one pass. The RL loss (r1mega/trainer/rl/loss.py) decides when it runs and
supplies its PyTorch path, which is the kernel's oracle: before the kernel's first use with some
settings in a process, both run on a synthetic batch that takes every branch, and a kernel that
disagrees gives way to the PyTorch path.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from r1mega.ops.kernels import available, failed, load, verified, verify_once

KL_MODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}  # kernels/csrc/grpo_loss_math.cuh's KLMode

# (values, d loss / d logp) of one path on the check batch; values are loss, pg, kl, ratio flattened
CheckRun = Callable[[dict], Tuple[torch.Tensor, torch.Tensor]]


def runs_on(logp: torch.Tensor) -> bool:
    """Whether the kernel can run on these log-probs (fp32 on CUDA, kernels built)."""
    return logp.dtype == torch.float32 and available(logp)


class FusedTokenLoss(torch.autograd.Function):
    """loss = sum(w * (pg + kl_beta * kl)); the kernel gives d loss / d logp along with the values."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, adv, mask, tis, weight, eps_low, eps_high, dual_clip, kl_mode,
                kl_beta):
        shape = logp.shape
        flat = lambda t: t.reshape(-1).float().contiguous() if t is not None else logp.new_empty(0)  # noqa: E731
        pg, kl, ratio, g_logp = load().grpo_token_loss(
            mask.reshape(-1).contiguous(), flat(logp), flat(old_logp), flat(ref_logp if kl_mode else None),
            flat(adv), flat(tis), flat(weight), eps_low, eps_high, dual_clip or 0.0, kl_mode, kl_beta)
        loss = (weight.reshape(-1) * (pg + kl_beta * kl)).sum()
        outs = [t.view(shape) for t in (pg, kl, ratio, g_logp)]
        ctx.save_for_backward(outs[-1])
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, g_loss, *_):
        (g_logp,) = ctx.saved_tensors
        return (g_logp * g_loss,) + (None,) * 11


def fused_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                     token_adv: torch.Tensor, mask: torch.Tensor, tis: Optional[torch.Tensor], weight: torch.Tensor,
                     eps_low: float, eps_high: float, dual_clip: Optional[float], kl_beta: float,
                     kl_estimator: str):
    """(loss, pg, kl, ratio, d loss / d logp) of [B, T] inputs; token_adv and weight [B, T], 0 off the
    mask (weight: each token's share of the aggregated loss). Only the loss is differentiable."""
    kl_mode = KL_MODES[kl_estimator] if kl_beta > 0 else 0
    return FusedTokenLoss.apply(logp, old_logp, ref_logp, token_adv, mask, tis, weight, eps_low, eps_high,
                                dual_clip, kl_mode, kl_beta)


def check_batch(device: torch.device) -> dict:
    """A batch that takes every branch: both clips, the dual clip, log-ratios past and on the +-20
    bounds, zero advantages, NaN and inf off the mask, TIS weights."""
    g = torch.Generator().manual_seed(0)
    b, t = 16, 256
    logp = -8 * torch.rand(b, t, generator=g)
    old = logp + 0.4 * torch.randn(b, t, generator=g)
    old[:, ::37] = logp[:, ::37] + torch.where(torch.rand(b, 1, generator=g) < 0.5, -25.0, 25.0)
    ref = logp + 0.5 * torch.randn(b, t, generator=g)
    ref[:, 1::41] = logp[:, 1::41] - 30.0
    logp[:, 2], old[:, 2], ref[:, 2] = -1.0, -21.0, 19.0  # exactly on the bounds
    adv = 2 * torch.randn(b, generator=g)
    adv[::4] = 0.0
    mask = torch.rand(b, t, generator=g) < 0.85
    mask[:, 2] = True
    logp[~mask], old[~mask] = float("nan"), float("inf")
    tis = torch.where(mask, 2 * torch.rand(b, t, generator=g), 0.0)
    names = ("logp", "old_logp", "ref_logp", "advantages", "mask", "tis")
    return {k: v.to(device) for k, v in zip(names, (logp, old, ref, adv, mask, tis))}


def trusted(op: str, device: torch.device, kernel: CheckRun, pytorch: CheckRun) -> bool:
    """Whether the kernel may run with the settings `op` names: checked once per process against
    the PyTorch path on check_batch, values and gradients element by element. On a mismatch the
    PyTorch path runs (the loss issues no collective, so ranks need not agree)."""
    if verified(op + " grad"):
        return True
    if failed(op) or failed(op + " grad"):
        return False
    batch = check_batch(device)
    values, grad = kernel(batch)
    want_values, want_grad = pytorch(batch)
    # element by element: ratios past the clamp reach e^20, next to gradients of about 1 / tokens
    return (verify_once(op, values, lambda: want_values, 1e-5, atol=1e-6)
            and verify_once(op + " grad", grad, lambda: want_grad, 1e-5, atol=1e-9))
