"""The fused-loss dispatch point on the CPU, with a stand-in for the CUDA kernel that keeps its
contract (per-token pg, kl, ratio and w * d(pg + beta kl)/d logp from flat inputs): the
autograd function, the aggregation weights and the flattening give the PyTorch path's loss
and gradient, and the first-use self-check passes a faithful kernel and sends a wrong one to the PyTorch path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.policy_loss import clipped_surrogate, log_ratio
from r1mega.ops import grpo_loss as grpo_kernel
from r1mega.trainer.rl import loss as grpo_loss

ESTIMATORS = {1: "k1", 2: "k2", 3: "k3"}


def _kernel_stand_in(bad_clip: bool = False):
    def grpo_token_loss(mask, logp, old, ref, adv, tis, weight, eps_low, eps_high, dual_clip, kl_mode, beta):
        m, lp = mask[None], logp[None].clone().requires_grad_(True)
        with torch.enable_grad():  # autograd functions run their forward without it
            # a wrong kernel: the clip range ignores eps_high
            pg, _ = clipped_surrogate(lp, old[None], adv[None], m, eps_low, eps_low if bad_clip else eps_high,
                                      dual_clip or None)
            pg = pg * torch.where(m, tis[None], 0.0) if tis.numel() else pg
            kl = kl_penalty(lp, ref[None], ESTIMATORS[kl_mode], m) if kl_mode else torch.zeros_like(pg)
            (g,) = torch.autograd.grad((pg + beta * kl).sum(), lp)
        ratio = log_ratio(logp[None], old[None], m).exp()
        return [pg.detach()[0], kl.detach()[0], ratio[0], torch.where(mask, weight * g[0], 0.0)]

    return SimpleNamespace(grpo_token_loss=grpo_token_loss)


@pytest.fixture
def stand_in(monkeypatch, fresh_kernel_checks):
    def use(**kw):
        monkeypatch.setattr(grpo_kernel, "load", lambda: _kernel_stand_in(**kw))
        monkeypatch.setattr(grpo_kernel, "available", lambda *t: True)
    return use


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -5 * torch.rand(6, 11, generator=g)
    old = logp + 0.4 * torch.randn(6, 11, generator=g)
    ref = logp + 0.3 * torch.randn(6, 11, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.rand(6, 11, generator=g) < 0.8
    tis = torch.where(mask, 2 * torch.rand(6, 11, generator=g), 0.0)
    return logp, old, ref, adv, mask, tis


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl", [(0.0, "k3"), (0.1, "k1"), (0.1, "k3")])
@pytest.mark.parametrize("dual_clip,with_tis", [(None, False), (3.0, True)])
def test_fused_path_equals_pytorch_path(stand_in, mode, kl, dual_clip, with_tis):
    stand_in()
    logp, old, ref, adv, mask, tis = _batch(seed=len(mode))
    s = grpo_loss.Surrogate(0.2, 0.28, dual_clip, "token", *kl)
    counts = dict(mode=mode, num_tokens=40.0, num_seqs=9.0, norm_length=16)
    tis = tis if with_tis else None
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    got = grpo_loss.policy_terms(a, old, ref, adv, mask, tis, s, **counts)
    assert "Fused" in type(got.loss.grad_fn).__name__
    want = grpo_loss.pytorch_terms(b, old, ref, adv, mask, tis, s, counts)
    (ga,), (gb,) = torch.autograd.grad(got.loss, a), torch.autograd.grad(want.loss, b)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    for name in ("pg", "kl", "ratio"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7)


def test_self_check_sends_a_wrong_kernel_to_the_pytorch_path(stand_in, caplog):
    """Even when the run's first batch is on-policy (ratio 1: no clipping to compare)."""
    stand_in(bad_clip=True)
    logp, _, ref, adv, mask, _ = _batch(seed=3)
    s = grpo_loss.Surrogate(0.2, 0.28, None, "token", 0.1, "k3")
    with caplog.at_level("ERROR", logger="r1mega.ops.kernels"):
        terms = grpo_loss.policy_terms(logp.clone().requires_grad_(True), logp, ref, adv, mask, None, s)
    assert "disagrees with its reference" in caplog.text
    assert "Fused" not in type(terms.loss.grad_fn).__name__
    want = grpo_loss.pytorch_terms(logp.clone().requires_grad_(True), logp, ref, adv, mask, None, s, {})
    assert torch.equal(terms.loss, want.loss)


def test_sequence_ratios_never_take_the_kernel(stand_in):
    stand_in()
    logp, old, ref, adv, mask, _ = _batch(seed=4)
    s = grpo_loss.Surrogate(3e-4, 4e-4, None, "sequence", 0.0, "k3")
    terms = grpo_loss.policy_terms(logp.clone().requires_grad_(True), old, ref, adv, mask, None, s)
    assert "Fused" not in type(terms.loss.grad_fn).__name__
