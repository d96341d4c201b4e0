"""token_logprobs (single shard): values and gradients against log_softmax, gradcheck, chunking, -inf/NaN."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from r1mega.ops.logprobs import token_logprobs


def naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full log_softmax, gather, -sum p log p."""
    logsm = torch.log_softmax(logits / temperature, dim=-1)
    return logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _inputs(n=37, v=53, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return logits, torch.randint(0, v, (n,), generator=gen), torch.randn(2, n, generator=gen, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _values_and_grads(fn, logits, targets, weights, temperature):
    """(logp, entropy, d(w0 . logp + w1 . entropy)/dlogits) of fn."""
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(x, targets, temperature)
    (weights[0].to(logp.dtype) @ logp + weights[1].to(ent.dtype) @ ent).backward()
    return logp.detach(), ent.detach(), x.grad


def _ours(x, targets, temperature, chunk_rows=8):
    return token_logprobs(x, targets, temperature=temperature, with_entropy=True, chunk_rows=chunk_rows)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_naive_fp64(temperature):
    logits, targets, w = _inputs()
    ours = _values_and_grads(_ours, logits, targets, w, temperature)
    ref = _values_and_grads(naive, logits, targets, w, temperature)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float64 and _rel(a, b) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-5)])
def test_low_precision_accumulates_in_fp32(dtype, tol):
    logits, targets, w = _inputs(dtype=dtype)
    logp, ent, grad = _values_and_grads(_ours, logits, targets, w, 0.8)
    # reference: exact math on the same (rounded) input values
    ref = _values_and_grads(naive, logits.double(), targets, w, 0.8)
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    assert _rel(logp, ref[0]) < tol and _rel(ent, ref[1]) < tol
    assert _rel(grad, ref[2]) < (tol if dtype == torch.float32 else 1e-2)  # bf16 gradient storage


def test_gradcheck():
    logits, targets, _ = _inputs(n=6, v=9)
    x = logits.clone().requires_grad_(True)
    both = partial(token_logprobs, targets=targets, temperature=0.7, with_entropy=True, chunk_rows=4)
    assert torch.autograd.gradcheck(both, (x,))
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, targets, temperature=1.3, chunk_rows=4)[0], (x,))
    assert torch.autograd.gradcheck(lambda z: both(z)[1], (x,))  # entropy alone


def test_chunking_does_not_change_results():
    logits, targets, w = _inputs(dtype=torch.float32)
    results = [_values_and_grads(partial(_ours, chunk_rows=c), logits, targets, w, 0.9) for c in (1, 5, 37, 4096)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_leading_dims_and_no_entropy():
    logits, targets, _ = _inputs(n=12)
    logp, ent = token_logprobs(logits.view(3, 4, -1), targets.view(3, 4))
    assert ent is None and logp.shape == (3, 4)
    torch.testing.assert_close(logp.reshape(-1), naive(logits, targets, 1.0)[0])


def test_negative_infinity_logits_are_padding():
    logits, targets, w = _inputs(n=10, v=20)
    padded = torch.cat([logits, torch.full((10, 4), float("-inf"), dtype=torch.float64)], dim=-1)
    logp, ent, grad = _values_and_grads(_ours, padded, targets, w, 0.7)
    ref = _values_and_grads(naive, logits, targets, w, 0.7)  # the distribution without the padding
    torch.testing.assert_close(logp, ref[0])
    torch.testing.assert_close(ent, ref[1])
    torch.testing.assert_close(grad[:, :20], ref[2])
    assert torch.equal(grad[:, 20:], torch.zeros(10, 4, dtype=torch.float64))
    # a target on a padded entry has probability 0: logp = -inf, gradient still finite
    x = padded.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, torch.full((10,), 22), with_entropy=True)
    assert torch.isneginf(logp).all() and torch.isfinite(ent).all()
    ent.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_nan_logits_are_not_hidden():
    logits, targets, _ = _inputs(n=4, v=8)
    logits[1, 3] = float("nan")
    logp, ent = token_logprobs(logits, targets, with_entropy=True)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(logp[[0, 2, 3]]).all() and torch.isfinite(ent[[0, 2, 3]]).all()


def test_rejects_bad_temperature():
    logits, targets, _ = _inputs(n=2, v=3)
    with pytest.raises(ValueError):
        token_logprobs(logits, targets, temperature=0.0)
