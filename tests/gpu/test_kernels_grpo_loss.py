"""The fused per-token GRPO loss kernel (kernels/csrc/grpo_loss.cu) through the RL loss's dispatch
point, r1mega.trainer.rl.loss.policy_terms, against the PyTorch path on the same inputs: loss, per-token
terms and d loss / d logp, for every aggregation mode, KL estimator, dual clip and TIS, with
masked positions holding NaN and inf, and more tokens than one grid covers."""

from __future__ import annotations

import pytest
import torch

from r1mega.trainer.rl import loss as grpo_loss
from r1mega.ops.kernels import load

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if load() is None:
        pytest.skip("r1mega kernels could not be built here (no CUDA toolkit?)")


def _inputs(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -6 * torch.rand(b, t, generator=g)
    old = logp + 0.3 * torch.randn(b, t, generator=g)
    ref = logp + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    adv[::5] = 0.0
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[0] = False
    logp[~mask] = float("nan")
    old[~mask] = float("inf")
    tis = torch.where(mask, 2 * torch.rand(b, t, generator=g), 0.0)
    return [x.cuda() for x in (logp, old, ref, adv, mask, tis)]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl", [(0.0, "k3"), (0.04, "k1"), (0.04, "k2"), (0.04, "k3")])
@pytest.mark.parametrize("dual_clip,with_tis", [(None, False), (3.0, True)])
@pytest.mark.parametrize("shape", [(6, 37), (512, 40_000)], ids=["small", "past_one_grid"])
def test_fused_terms_equal_the_pytorch_path(mode, kl, dual_clip, with_tis, shape):
    logp, old, ref, adv, mask, tis = _inputs(*shape, seed=shape[1] + len(mode))
    s = grpo_loss.Surrogate(0.2, 0.28, dual_clip, "token", *kl)
    counts = dict(mode=mode, num_tokens=float(mask.sum()) * 1.5, num_seqs=shape[0] * 2.0, norm_length=64)
    tis = tis if with_tis else None
    leaf = logp.clone().requires_grad_(True)
    got = grpo_loss.policy_terms(leaf, old, ref, adv, mask, tis, s, **counts)
    assert got.loss.grad_fn is not None and "Fused" in type(got.loss.grad_fn).__name__  # the kernel ran
    (g_got,) = torch.autograd.grad(got.loss, leaf)
    want_leaf = logp.clone().requires_grad_(True)
    want = grpo_loss.pytorch_terms(want_leaf, old, ref, adv, mask, tis, s, counts)
    (g_want,) = torch.autograd.grad(want.loss, want_leaf)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-7)
    for name in ("pg", "kl", "ratio"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-9)
    assert torch.all(g_got[~mask] == 0) and torch.all(got.pg[~mask] == 0)


def test_sequence_ratios_take_the_pytorch_path():
    logp, old, ref, adv, mask, tis = _inputs(4, 9, seed=1)
    s = grpo_loss.Surrogate(3e-4, 4e-4, None, "sequence", 0.0, "k3")
    terms = grpo_loss.policy_terms(logp.clone().requires_grad_(True), old, ref, adv, mask, None, s)
    assert "Fused" not in type(terms.loss.grad_fn).__name__
