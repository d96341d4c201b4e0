"""Reduce a per-token loss [B, T] to a scalar with global (whole-minibatch) denominators."""

from __future__ import annotations

import torch

from r1mega.config.choices import AggregationMode

Count = int | float | torch.Tensor | None


def _denominator(value: Count, default: torch.Tensor | int) -> torch.Tensor | float:
    """A count usable as a divisor: the caller's global one, else the local one; never below 1."""
    value = default if value is None else value
    return value.clamp(min=1) if isinstance(value, torch.Tensor) else max(float(value), 1.0)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: AggregationMode = "token-mean", *,
              num_tokens: Count = None, num_seqs: Count = None, norm_length: Count = None) -> torch.Tensor:
    """Scalar loss of one micro-batch; summing it over all micro-batches and ranks gives the minibatch loss.

    num_tokens / num_seqs are the GLOBAL masked-token / sequence counts of the minibatch; when None
    the local ones are used. norm_length defaults to T (Dr. GRPO uses the max response length).
    Every row counts as a sequence, including an all-masked one (it adds 0).
    """
    m = mask.bool()
    # where, not a product: masked positions may hold inf/NaN that a product would spread.
    masked = torch.where(m, loss, torch.zeros_like(loss))
    if mode == "token-mean":
        return masked.sum() / _denominator(num_tokens, m.sum())
    if mode == "seq-mean-token-mean":
        seq_len = m.sum(-1).clamp(min=1).to(masked.dtype)
        return (masked.sum(-1) / seq_len).sum() / _denominator(num_seqs, m.shape[0])
    if mode == "seq-mean-token-sum-norm":
        length = _denominator(norm_length, m.shape[-1])
        return masked.sum() / (_denominator(num_seqs, m.shape[0]) * length)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def token_weights(mask: torch.Tensor, mode: AggregationMode = "token-mean", *, num_tokens: Count = None,
                  num_seqs: Count = None, norm_length: Count = None) -> torch.Tensor:
    """Each token's weight w [B, T] in `aggregate` (0 off the mask): aggregate(loss) equals
    (w * loss).sum() for a loss finite on the mask. The fused loss kernel takes these."""
    m = mask.bool()
    on = m.to(torch.float32)
    if mode == "token-mean":
        return on / _denominator(num_tokens, m.sum())
    if mode == "seq-mean-token-mean":
        seq_len = m.sum(-1, keepdim=True).clamp(min=1).to(on.dtype)
        return on / seq_len / _denominator(num_seqs, m.shape[0])
    if mode == "seq-mean-token-sum-norm":
        return on / (_denominator(num_seqs, m.shape[0]) * _denominator(norm_length, m.shape[-1]))
    raise ValueError(f"unknown aggregation mode {mode!r}")
