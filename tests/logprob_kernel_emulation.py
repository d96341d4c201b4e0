"""The CUDA log-prob kernels (kernels/csrc/grpo_logprobs.cu) emulated in PyTorch, fp32 arithmetic in
the kernel's own order: each of a block's 512 threads folds elements j, j + 512, ... into an
online (max, sum e^(z - m), sum (z - m) e^(z - m)) triple, then the triples merge in a tree.
Its rounding is the kernel's rounding (up to expf's last ulp), so checks that must pass the
real kernel are tried against it here; `wrong_temperature` makes a faulty one.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

THREADS = 512
NEG_INF = float("-inf")


def _merge(xm, xs, xb, ym, ys, yb):
    m = torch.maximum(xm, ym)
    empty = m == NEG_INF
    fx = torch.where(xm == NEG_INF, 0.0, torch.exp(xm - m))
    fy = torch.where(ym == NEG_INF, 0.0, torch.exp(ym - m))
    bx = torch.where(xm == NEG_INF, 0.0, fx * (xb + (xm - m) * xs))
    by = torch.where(ym == NEG_INF, 0.0, fy * (yb + (ym - m) * ys))
    s, b = fx * xs + fy * ys, bx + by
    return m, torch.where(empty, 0.0, s), torch.where(empty, 0.0, b)


def partials(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float):
    rows, vocab = logits.shape
    z = logits.float() * torch.tensor(inv_temp, dtype=torch.float32)
    lanes = -(-vocab // THREADS) * THREADS
    z = torch.cat([z, z.new_full((rows, lanes - vocab), NEG_INF)], dim=1).view(rows, -1, THREADS)
    m = z.new_full((rows, THREADS), NEG_INF)
    s, b = torch.zeros_like(m), torch.zeros_like(m)
    for k in range(z.shape[1]):  # each thread's sequential pass (push)
        v = z[:, k]
        skip = v == NEG_INF
        up = v > m
        f = torch.where(m == NEG_INF, 0.0, torch.exp(m - v))
        s_up = s * f + 1.0
        b_up = f * (b + torch.where(m == NEG_INF, 0.0, (m - v) * s))
        e = torch.exp(v - m)
        s_in, b_in = s + e, b + (v - m) * e
        m, s, b = (torch.where(skip, m, torch.where(up, v, m)), torch.where(skip, s, torch.where(up, s_up, s_in)),
                   torch.where(skip, b, torch.where(up, b_up, b_in)))
    width = THREADS
    while width > 1:  # shared-memory tree: thread t merges t + width / 2
        half = width // 2
        m, s, b = _merge(m[:, :half], s[:, :half], b[:, :half], m[:, half:width], s[:, half:width], b[:, half:width])
        width = half
    local = targets - vocab_start
    inside = (local >= 0) & (local < vocab)
    zy = torch.where(inside, logits.float().gather(1, local.clamp(0, vocab - 1)[:, None])[:, 0] * inv_temp, 0.0)
    return m[:, 0], s[:, 0], b[:, 0], zy


def backward_(logits, targets, vocab_start, inv_temp, lse, entropy, g_logp, g_ent):
    logp = (logits.float() * inv_temp - lse[:, None]).clamp(min=-3.0e38)
    p = logp.exp()
    zero = torch.zeros_like(lse)[:, None]
    gl = g_logp[:, None] if g_logp.numel() else zero
    ge = g_ent[:, None] if g_ent.numel() else zero
    h = entropy[:, None] if g_ent.numel() else zero
    grad = -(p * ge) * (logp + h) - p * gl
    local = targets - vocab_start
    inside = (local >= 0) & (local < logits.shape[1])
    grad.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None], torch.where(inside[:, None], gl, 0.0))
    logits.copy_(grad * inv_temp)


def kernels(wrong_temperature: bool = False, rows_seen: list | None = None) -> SimpleNamespace:
    """A stand-in for r1mega's extension module: its logprob_partials and logprob_backward_."""

    def logprob_partials(logits, targets, vocab_start, inv_temp):
        if rows_seen is not None:
            rows_seen.append(logits.shape[0])
        return partials(logits, targets, vocab_start, 1.0 if wrong_temperature else inv_temp)

    return SimpleNamespace(logprob_partials=logprob_partials, logprob_backward_=backward_)
