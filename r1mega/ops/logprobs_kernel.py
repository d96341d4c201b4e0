"""The CUDA path of token_logprobs: one read of the logits forward, the gradient written into
the logits buffer backward (kernels/csrc/grpo_logprobs.cu).

r1mega.ops.logprobs' autograd function calls `forward` and `backward_` for CUDA inputs. The
kernels give per-row partials of this rank's vocab slice; `combine` turns them into log-probs,
log-sum-exp and entropy across the tensor-parallel group, with the same two all-reduces and
the same edge cases as the PyTorch reference in r1mega/ops/logprobs.py.

In place: backward overwrites the logits the forward read and returns that buffer as their
gradient, so no second [tokens, vocab] buffer exists; nothing else may read those logits after
the loss.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from r1mega.ops.kernels import failed, load, verified, verify_once


def combine(m: torch.Tensor, s: torch.Tensor, b: torch.Tensor, zy: torch.Tensor, targets: torch.Tensor,
            vocab_start: int, vocab_local: int, group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy) from per-slice (max m, sum e^(z-m), sum (z-m) e^(z-m), target z)."""
    m_all = m.clone()
    if group is not None:
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    empty = m == float("-inf")  # a slice of only -inf logits adds nothing (and would give inf - inf)
    shift = torch.where(empty, 0.0, m - m_all)
    f = torch.where(empty, 0.0, shift.exp())
    local = targets - vocab_start
    inside = (local >= 0) & (local < vocab_local)
    stats = torch.stack([f * s, torch.where(empty, 0.0, f * (b + shift * s)), torch.where(inside, zy - m_all, 0.0)])
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s_all, b_all, zy_rel = stats
    log_s = s_all.log()
    return zy_rel - log_s, m_all + log_s, log_s - b_all / s_all


def forward(logits: torch.Tensor, targets: torch.Tensor, group, vocab_start: int,
            temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy) of contiguous fp32/bf16 logits [N, V_local], from one read of them."""
    m, s, b, zy = load().logprob_partials(logits, targets, vocab_start, 1.0 / temperature)
    return combine(m, s, b, zy, targets, vocab_start, logits.shape[1], group)


def backward_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
              g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], vocab_start: int,
              temperature: float) -> torch.Tensor:
    """The gradient w.r.t. the logits, written into them; returns that buffer (detached)."""
    as_f32 = lambda t: t.float().contiguous() if t is not None else lse.new_empty(0)  # noqa: E731
    load().logprob_backward_(logits, targets, vocab_start, 1.0 / temperature, lse, as_f32(entropy),
                             as_f32(g_logp), as_f32(g_ent))
    torch.autograd.graph.increment_version(logits)  # a node that saved these logits now fails loudly
    return logits.detach()


# (rows, vocab) of the check: a Qwen-sized vocabulary, and one that is not a multiple of the block
CHECK_SHAPES = ((16, 151_936), (37, 1031))


def checked(dtype: torch.dtype, device: torch.device, pytorch_path) -> bool:
    """Whether the kernels may run on `dtype` logits: before their first use in a process (per
    dtype), forward and backward against `pytorch_path(logits, targets, temperature) -> (logp,
    entropy)`, the PyTorch definition, in float64 on synthetic rows that take
    every case: peaked rows (one logit far above the rest, where sums are dominated by one
    term), uniform rows, -inf vocabulary padding and a target on it, rows of zero loss weight,
    temperature 1 and 0.7. Element by element within atol + rtol * |reference|: the kernels'
    reduction order differs from the reference's by a few fp32 ulps of the row sums."""
    op = f"logprobs[{dtype}]"
    if verified(op + " backward"):
        return True
    if failed(op) or failed(op + " backward"):
        return False
    got, want, got_grad, want_grad = [], [], [], []
    for i, (rows, vocab) in enumerate(CHECK_SHAPES):
        for temperature in (1.0, 0.7):
            logits, targets, g_logp, g_ent = _synthetic(rows, vocab, dtype, device, seed=10 * i + int(temperature * 7))
            logp, lse, entropy = forward(logits, targets, None, 0, temperature)
            got += [logp, entropy]
            got_grad.append(backward_(logits.clone(), targets, lse, entropy, g_logp, g_ent, 0, temperature).float())
            ref = _pytorch_values(pytorch_path, logits, targets, temperature, g_logp, g_ent)
            want += ref[:2]
            want_grad.append(ref[2])
    cat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    # fp32's log p = z / T - lse carries about |z / T| x 6e-8 absolute error (z up to 57 here), which
    # the gradient next to a near-certain target (g (1 - p)) keeps; bf16 gradients are also
    # rounded to bf16 when written into the logits
    grad_tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    return (verify_once(op, cat(got), lambda: cat(want), 1e-4, atol=1e-4)
            and verify_once(op + " backward", cat(got_grad), lambda: cat(want_grad), grad_tol, atol=2e-5))


def _synthetic(rows: int, vocab: int, dtype: torch.dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, vocab, generator=g)
    logits[0::4, :] = 0.0  # uniform
    peak = torch.randint(0, vocab - 8, (rows,), generator=g)
    height = torch.where(torch.arange(rows) % 8 == 1, 40.0, 22.0)  # probability ~1, and ~0.99, on one token
    logits[1::4].scatter_(1, peak[1::4, None], height[1::4, None])
    logits[:, -8:] = float("-inf")  # vocabulary padding
    targets = torch.randint(0, vocab - 8, (rows,), generator=g)
    targets[1::4] = peak[1::4]
    targets[3] = vocab - 1  # a target on padding: logp = -inf
    g_logp = torch.randn(rows, generator=g)
    g_ent = torch.randn(rows, generator=g)
    g_logp[2::5], g_ent[2::5] = 0.0, 0.0  # outside the loss mask
    g_logp[3] = 0.0  # its logp is -inf: no loss reads it
    return (logits.to(device, dtype).contiguous(), targets.to(device), g_logp.to(device), g_ent.to(device))


def _pytorch_values(pytorch_path, logits, targets, temperature, g_logp, g_ent):
    """(logp, entropy, gradient) of the PyTorch definition in float64."""
    x = logits.detach().double().requires_grad_(True)
    with torch.enable_grad():
        logp, entropy = pytorch_path(x, targets, temperature)
        finite = torch.isfinite(logp)
        loss = (torch.where(finite, logp, 0.0) * g_logp.double()).sum() + (entropy * g_ent.double()).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), entropy.detach(), grad
