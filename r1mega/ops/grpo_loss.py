"""The per-token half of the GRPO-family loss: the one dispatch point for the trainer.

From the sampled tokens' log-probs (r1mega.ops.logprobs), the clipped surrogate against the old
policy (times the TIS weight), the KL estimate against the reference policy, and their
aggregation into the minibatch loss. On CUDA, with the kernels built and token-level ratios,
one kernel (kernels/csrc/grpo_loss.cu) computes every term and d loss / d logp in one pass;
elsewhere the PyTorch definitions in r1mega.algorithms run, and they are the kernel's oracle
(checked against them on a synthetic batch before the kernel's first use in a process; a kernel
that disagrees gives way to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from r1mega.algorithms.aggregation import aggregate, token_weights
from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.policy_loss import clipped_surrogate, log_ratio, token_advantages
from r1mega.ops.kernels import available, failed, load, verified, verify_once

KL_MODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}  # kernels/csrc/grpo_loss_math.cuh's KLMode


@dataclass(frozen=True)
class Surrogate:
    """What the loss is made of (the algorithm config's part of it)."""

    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    ratio_level: str  # "token" or "sequence" (GSPO)
    kl_beta: float
    kl_estimator: str


class PolicyTerms(NamedTuple):
    loss: torch.Tensor  # scalar: aggregate(pg + kl_beta * kl), differentiable in logp
    pg: torch.Tensor  # [B, T] surrogate times the TIS weight, 0 off the mask (detached)
    kl: torch.Tensor  # [B, T] KL estimate, 0 off the mask or when kl_beta is 0 (detached)
    ratio: torch.Tensor  # [B, T] pi / pi_old, 1 off the mask (detached)


def policy_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
                 advantages: torch.Tensor, mask: torch.Tensor, tis: Optional[torch.Tensor], s: Surrogate,
                 **counts) -> PolicyTerms:
    """The policy terms of [B, T] log-probs; advantages [B] or [B, T]; tis the detached TIS weights
    (None: off); counts are aggregate()'s (mode, num_tokens, num_seqs, norm_length)."""
    if s.ratio_level == "token" and logp.dtype == torch.float32 and available(logp) and _self_check(
            s, counts.get("mode", "token-mean"), logp.device):
        return PolicyTerms(*_fused_with_grad(logp, old_logp, ref_logp, advantages, mask, tis, s, counts)[:4])
    return reference(logp, old_logp, ref_logp, advantages, mask, tis, s, counts)


def reference(logp, old_logp, ref_logp, advantages, mask, tis, s: Surrogate, counts: dict) -> PolicyTerms:
    """The PyTorch definitions, differentiable through autograd."""
    pg, _ = clipped_surrogate(logp, old_logp, advantages, mask, s.eps_low, s.eps_high, s.dual_clip, s.ratio_level)
    if tis is not None:
        pg = pg * tis
    kl = kl_penalty(logp, ref_logp, s.kl_estimator, mask) if s.kl_beta > 0 else torch.zeros_like(logp)
    loss = aggregate(pg + s.kl_beta * kl, mask, **counts)
    ratio = log_ratio(logp.detach(), old_logp, mask.bool(), s.ratio_level).exp()
    return PolicyTerms(loss, pg.detach(), kl.detach(), ratio)


class _FusedTerms(torch.autograd.Function):
    """loss = sum(w * (pg + beta * kl)); the kernel gives d loss / d logp along with the values
    (also returned, for the first-use check)."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, adv, mask, tis, weight, s: Surrogate):
        shape = logp.shape
        flat = lambda t: t.reshape(-1).float().contiguous() if t is not None else logp.new_empty(0)  # noqa: E731
        kl_mode = KL_MODES[s.kl_estimator] if s.kl_beta > 0 else 0
        pg, kl, ratio, g_logp = load().grpo_token_loss(
            mask.reshape(-1).contiguous(), flat(logp), flat(old_logp), flat(ref_logp if kl_mode else None),
            flat(adv), flat(tis), flat(weight), s.eps_low, s.eps_high, s.dual_clip or 0.0, kl_mode, s.kl_beta)
        loss = (weight.reshape(-1) * (pg + s.kl_beta * kl)).sum()
        outs = [t.view(shape) for t in (pg, kl, ratio, g_logp)]
        ctx.save_for_backward(outs[-1])
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)  # g_logp last: the self-check compares it

    @staticmethod
    def backward(ctx, g_loss, *_):
        (g_logp,) = ctx.saved_tensors
        return g_logp * g_loss, None, None, None, None, None, None, None


def _fused_with_grad(logp, old_logp, ref_logp, advantages, mask, tis, s: Surrogate, counts: dict):
    m = mask.bool()
    weight = token_weights(m, **counts)
    return _FusedTerms.apply(logp, old_logp, ref_logp, token_advantages(advantages, m, logp), m, tis, weight, s)


def _self_check(s: Surrogate, mode: str, device: torch.device) -> bool:
    """Whether the kernel may run with these settings: before its first use with them in a
    process, kernel and PyTorch path on a synthetic batch that takes every branch (both clips, dual
    clip, log-ratios past and on the +-20 clamps, zero advantages, NaN and inf off the mask),
    values and gradients through the autograd function. On a mismatch the PyTorch path runs (the
    loss issues no collective, so ranks need not agree)."""
    op = f"grpo_token_loss[{s}, {mode}]"
    if verified(op + " grad"):
        return True
    if failed(op) or failed(op + " grad"):
        return False
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
    logp, old, ref, adv, mask, tis = (x.to(device) for x in (logp, old, ref, adv, mask, tis))
    counts = {"mode": mode}
    leaf = logp.clone().requires_grad_(True)
    with torch.enable_grad():
        loss, pg, kl, ratio, _ = _fused_with_grad(leaf, old, ref, adv, mask, tis, s, counts)
        (grad,) = torch.autograd.grad(loss, leaf)
    want, want_grad = _reference_with_grad(logp, old, ref, adv, mask, tis, s, counts)
    # element by element: ratios past the clamp reach e^20, next to gradients of about 1 / tokens
    return (verify_once(op, _values(PolicyTerms(loss, pg, kl, ratio)), lambda: _values(want), 1e-5, atol=1e-6)
            and verify_once(op + " grad", grad, lambda: want_grad, 1e-5, atol=1e-9))


def _values(terms: PolicyTerms) -> torch.Tensor:
    return torch.cat([terms.loss.detach().reshape(1), terms.pg.flatten(), terms.kl.flatten(), terms.ratio.flatten()])


def _reference_with_grad(logp, old_logp, ref_logp, advantages, mask, tis, s, counts):
    leaf = logp.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = reference(leaf, old_logp, ref_logp, advantages, mask, tis, s, counts)
        (grad,) = torch.autograd.grad(terms.loss, leaf)
    return PolicyTerms(terms.loss.detach(), terms.pg, terms.kl, terms.ratio), grad
