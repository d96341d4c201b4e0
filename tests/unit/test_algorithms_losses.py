"""Clipped surrogate (clip-higher, dual clip, GSPO), TIS weights, KL estimators and aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.algorithms.aggregation import aggregate, token_weights
from r1mega.algorithms.kl import kl_penalty
from r1mega.algorithms.off_policy import correction_weights
from r1mega.algorithms.policy_loss import clipped_surrogate, logprob_gap_stats

RATIOS = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 5.0], dtype=torch.float64)


def _token_inputs(adv_sign: float):
    """One row with the ratios above (old_logp = 0) and a shared advantage of +-1."""
    logp = RATIOS.log().unsqueeze(0).requires_grad_(True)
    adv = torch.full((1, RATIOS.numel()), adv_sign, dtype=torch.float64)
    return logp, torch.zeros_like(logp), adv, torch.ones_like(logp, dtype=torch.bool)


def test_clip_higher_positive_advantage():
    logp, old, adv, mask = _token_inputs(+1.0)
    loss, stats = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss[0], -torch.tensor([0.5, 0.9, 1.0, 1.1, 1.28, 1.28]).double())
    loss.sum().backward()
    # d(-rho A)/dlogp = -rho A where unclipped; 0 where the upper clip is active (1.5, 5.0)
    torch.testing.assert_close(logp.grad[0], -torch.tensor([0.5, 0.9, 1.0, 1.1, 0.0, 0.0]).double())
    assert stats["clip_fraction"].item() == pytest.approx(2 / 6)
    assert stats["clip_fraction_high"].item() == pytest.approx(2 / 6)
    assert stats["clip_fraction_low"].item() == 0.0
    assert stats["ratio_max"].item() == pytest.approx(5.0)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(RATIOS.mean().item())
    assert all(not v.requires_grad for v in stats.values())


def test_clip_low_negative_advantage_and_dual_clip():
    logp, old, adv, mask = _token_inputs(-1.0)
    loss, stats = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss[0], torch.tensor([0.8, 0.9, 1.0, 1.1, 1.5, 5.0]).double())
    assert stats["clip_fraction_low"].item() == pytest.approx(1 / 6)
    loss, stats = clipped_surrogate(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss[0], torch.tensor([0.8, 0.9, 1.0, 1.1, 1.5, 3.0]).double())
    loss.sum().backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([0.0, 0.9, 1.0, 1.1, 1.5, 0.0]).double())
    assert stats["dual_clip_fraction"].item() == pytest.approx(1 / 6)
    # dual clip leaves positive advantages alone
    logp, old, adv, mask = _token_inputs(+1.0)
    plain, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    dual, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    assert torch.equal(plain, dual)
    with pytest.raises(ValueError):
        clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, dual_clip=1.0)


def test_masked_garbage_gives_zero_loss_and_finite_grads():
    logp = torch.tensor([[-0.5, float("-inf"), float("nan")]], requires_grad=True)
    old = torch.tensor([[-0.4, float("-inf"), 3.0]])
    adv = torch.tensor([[1.0, float("nan"), 2.0]])
    mask = torch.tensor([[True, False, False]])
    for level in ("token", "sequence"):
        logp.grad = None
        loss, stats = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, dual_clip=3.0, ratio_level=level)
        assert torch.equal(loss[0, 1:], torch.zeros(2))
        loss.sum().backward()
        assert torch.isfinite(logp.grad).all() and torch.equal(logp.grad[0, 1:], torch.zeros(2))
        assert all(torch.isfinite(v) for v in stats.values())
    empty, stats = clipped_surrogate(logp, old, adv, torch.zeros_like(mask), 0.2, 0.2)
    assert torch.equal(empty, torch.zeros_like(empty))
    assert all(v.item() == 0.0 for v in stats.values())


def test_gspo_sequence_ratio_and_per_token_gradient():
    diffs = torch.tensor([[0.1, -0.2, 0.4, 9.0], [0.02, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    old = torch.randn(2, 4, dtype=torch.float64)
    logp = (old + diffs).requires_grad_(True)
    adv = torch.tensor([1.5, -2.0], dtype=torch.float64)
    s = torch.tensor([math.exp(0.1), math.exp(0.01)], dtype=torch.float64)  # exp(mean log-ratio)
    loss, stats = clipped_surrogate(logp, old, adv, mask, 0.5, 0.5, ratio_level="sequence")
    expected = torch.where(mask, (-s * adv).unsqueeze(-1), 0.0)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    # every token of response i gets the sequence weight s_i: d loss_it / d logp_it = -s_i A_i
    torch.testing.assert_close(logp.grad, expected)
    assert stats["ratio_max"].item() == pytest.approx(s[0].item())
    # GSPO's tiny range: s_1 = e^0.1 > 1 + 4e-4 with A > 0 is clipped (value 1 + 4e-4, no gradient)
    logp.grad = None
    loss, stats = clipped_surrogate(logp, old, adv, mask, 3e-4, 4e-4, ratio_level="sequence")
    torch.testing.assert_close(loss[0, :3], torch.full((3,), -(1 + 4e-4) * 1.5, dtype=torch.float64))
    loss.sum().backward()
    assert torch.equal(logp.grad[0], torch.zeros(4, dtype=torch.float64))
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)


def test_truncated_is_weights_and_gap_stats():
    trainer = torch.tensor([[math.log(0.5), math.log(1.5), math.log(3.0), float("nan")]], requires_grad=True)
    rollout = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, _ = correction_weights(trainer, rollout, mask, weight="token", weight_cap=2.0)  # TIS
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 2.0, 0.0]]))
    assert not w.requires_grad
    stats = logprob_gap_stats(trainer, rollout, mask)
    gaps = [math.log(2.0), math.log(1.5), math.log(3.0)]
    assert stats["logprob_gap_mean"].item() == pytest.approx(sum(gaps) / 3)
    assert stats["logprob_gap_max"].item() == pytest.approx(math.log(3.0))


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = logp - ref  # 0.5, -1.0, 0
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(-d) + d - 1)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=gen) * 3, torch.randn(1000, generator=gen) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(a, b, "k4")


def test_kl_k3_gradient_zero_at_equality_and_clamped():
    logp = torch.tensor([-0.7, -3.0], requires_grad=True)
    ref = torch.tensor([-0.7, -1.0])
    kl_penalty(logp, ref, "k3").sum().backward()
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(1 - math.exp(2.0), rel=1e-6)
    extreme = kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")  # log-ratio clamped to 20
    assert torch.isfinite(extreme).all() and extreme.item() == pytest.approx(math.exp(20) - 21)
    masked = kl_penalty(torch.tensor([float("-inf"), -1.0]), torch.tensor([-1.0, -1.0]), "k3",
                        mask=torch.tensor([False, True]))
    assert torch.equal(masked, torch.zeros(2))


LOSS = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, float("inf"), 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("mode,kwargs,expected", [
    ("token-mean", {}, 15 / 5),
    ("seq-mean-token-mean", {}, (6 / 3 + 9 / 2) / 2),
    ("seq-mean-token-sum-norm", {}, 15 / (2 * 4)),
    ("seq-mean-token-sum-norm", {"norm_length": 10}, 15 / (2 * 10)),
    ("token-mean", {"num_tokens": 30}, 15 / 30),
    ("seq-mean-token-mean", {"num_seqs": torch.tensor(8)}, (6 / 3 + 9 / 2) / 8),
])
def test_aggregate_hand_values(mode, kwargs, expected):
    assert aggregate(LOSS, MASK, mode, **kwargs).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_micro_batch_split_equals_whole(mode):
    gen = torch.Generator().manual_seed(1)
    loss = torch.randn(10, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(0, 8, (10,), generator=gen)
    mask = torch.arange(7) < lengths.unsqueeze(-1)
    whole = aggregate(loss, mask, mode, norm_length=12)
    (g_whole,) = torch.autograd.grad(whole, loss)
    counts = [(mask[rows].sum(), mask[rows].shape[0]) for rows in (slice(0, 3), slice(3, 4), slice(4, 10))]
    num_tokens = sum(c[0] for c in counts)  # the caller's all-reduce over micro-batches / ranks
    num_seqs = sum(c[1] for c in counts)
    parts = sum(aggregate(loss[rows], mask[rows], mode, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_length=12) for rows in (slice(0, 3), slice(3, 4), slice(4, 10)))
    (g_parts,) = torch.autograd.grad(parts, loss)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-12)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError):
        aggregate(LOSS, MASK, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("counts", [{}, {"num_tokens": 37.0, "num_seqs": 9.0, "norm_length": 12}])
def test_token_weights_reproduce_aggregate(mode, counts):
    """The fused loss kernel aggregates with per-token weights; they give aggregate()'s value."""
    g = torch.Generator().manual_seed(5)
    loss = torch.randn(4, 7, dtype=torch.float64, generator=g)
    mask = torch.rand(4, 7, generator=g) < 0.6
    mask[2] = False  # an all-masked row still counts as a sequence
    loss[~mask] = float("nan")  # off the mask, anything
    w = token_weights(mask, mode, **counts)
    assert torch.all(w[~mask] == 0)
    got = (w.double() * torch.where(mask, loss, 0.0)).sum()
    assert got.item() == pytest.approx(aggregate(loss, mask, mode, **counts).item(), rel=1e-6)
