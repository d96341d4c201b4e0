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

from r1mega.ops.kernels import load, verified, verify_once

VERIFY_ROWS = 256  # rows of the first forward and backward (per dtype) also run through the reference


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
    from r1mega.ops.logprobs import reference

    m, s, b, zy = load().logprob_partials(logits, targets, vocab_start, 1.0 / temperature)
    logp, lse, entropy = combine(m, s, b, zy, targets, vocab_start, logits.shape[1], group)
    rows = slice(0, VERIFY_ROWS)  # every rank of the group checks the same rows (collective reference)
    verify_once(f"logprob_forward_{logits.dtype}", torch.cat([logp[rows], entropy[rows]]), lambda: torch.cat(
        reference(logits[rows].detach().float(), targets[rows], group, vocab_start, temperature)), 1e-6)
    return logp, lse, entropy


def backward_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
              g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], vocab_start: int,
              temperature: float) -> torch.Tensor:
    """The gradient w.r.t. the logits, written into them; returns that buffer (detached)."""
    as_f32 = lambda t: t.float().contiguous() if t is not None else lse.new_empty(0)  # noqa: E731
    op, rows, check = f"logprob_backward_{logits.dtype}", None, None
    if not verified(op):  # rows that carry gradient, computed before the kernel overwrites them
        weight = sum(g.abs() for g in (g_logp, g_ent) if g is not None)
        rows = weight.nonzero().flatten()[:VERIFY_ROWS]
        check = _reference_grad(logits, targets, lse, entropy, g_logp, g_ent, vocab_start, temperature, rows)
    load().logprob_backward_(logits, targets, vocab_start, 1.0 / temperature, lse, as_f32(entropy),
                             as_f32(g_logp), as_f32(g_ent))
    torch.autograd.graph.increment_version(logits)  # a node that saved these logits now fails loudly
    if check is not None:
        # bf16 gradients are rounded to bf16 (DESIGN.md: 1e-3 to 1e-2 for bf16)
        tol = 1e-2 if logits.dtype == torch.bfloat16 else 1e-5
        verify_once(op, logits[rows].float(), lambda: check, tol)
    return logits.detach()


def _reference_grad(logits, targets, lse, entropy, g_logp, g_ent, vocab_start, temperature,
                    rows: torch.Tensor) -> torch.Tensor:
    """The reference gradient of some rows."""
    from r1mega.ops.logprobs import _backward_chunk

    pick = lambda t: None if t is None else t[rows].float()  # noqa: E731
    return _backward_chunk(logits[rows].float(), targets[rows], lse[rows], pick(entropy) if g_ent is not None
                           else None, pick(g_logp), pick(g_ent), vocab_start, temperature, torch.float32)
