"""Off-policy corrections (r1mega.algorithms.off_policy) against hand-computed values: importance
weights at token, sequence and geometric level, truncation, rejection (MIS, IcePop, AReaL's cap),
the veto, and the ratio quantiles."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.algorithms.off_policy import (HIST_BINS, correction_weights, histogram_quantiles, log_rho,
                                          ratio_histogram)

LN = math.log


def _batch():
    """Two responses: rho = (1, 3, 0.5) and (0.4, 6) with a padded third column (NaN off the mask)."""
    prox = torch.tensor([[0.0, LN(3), LN(0.5)], [LN(0.4), LN(6), float("nan")]], dtype=torch.float64)
    behav = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return prox, behav, mask


def _close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=torch.float64), atol=1e-12, rtol=0)


def test_no_correction_gives_no_weights():
    weights, counts = correction_weights(*_batch())
    assert weights is None
    assert float(counts["rejected"]) == 0 and float(counts["weight"]) == 5.0


def test_token_weights_truncated_are_tis():
    prox, behav, mask = _batch()
    weights, counts = correction_weights(prox, behav, mask, weight="token", weight_cap=2.0)
    assert _close(weights, [[1.0, 2.0, 0.5], [0.4, 2.0, 0.0]])
    assert float(counts["truncated"]) == 2 and float(counts["rejected"]) == 0
    assert float(counts["weight"]) == pytest.approx(5.9)
    assert not correction_weights(prox.requires_grad_(True), behav, mask, weight="token")[0].requires_grad


def test_sequence_and_geometric_weights():
    prox, behav, mask = _batch()
    seq, _ = correction_weights(prox, behav, mask, weight="sequence")
    assert _close(seq, [[1.5, 1.5, 1.5], [2.4, 2.4, 0.0]])  # 1 x 3 x 0.5; 0.4 x 6
    geo, _ = correction_weights(prox, behav, mask, weight="geometric", weight_cap=1.2)
    assert _close(geo, [[1.5 ** (1 / 3)] * 3, [1.2, 1.2, 0.0]])  # 2.4 ** (1 / 2) = 1.55 > cap


def test_icepop_keeps_the_weight_inside_the_band():
    prox, behav, mask = _batch()
    weights, counts = correction_weights(prox, behav, mask, weight="token", reject="token", reject_low=0.5,
                                         reject_high=5.0)
    assert _close(weights, [[1.0, 3.0, 0.5], [0.0, 0.0, 0.0]])  # 0.4 < 0.5 and 6 > 5 rejected
    assert float(counts["rejected"]) == 2 and float(counts["rejected_rows"]) == 1


def test_decoupled_ppo_rejects_above_the_cap_only():
    """AReaL: weight rho where rho <= cap, 0 above (not truncated); no lower bound."""
    prox, behav, mask = _batch()
    weights, counts = correction_weights(prox, behav, mask, weight="token", reject="token", reject_high=5.0)
    assert _close(weights, [[1.0, 3.0, 0.5], [0.4, 0.0, 0.0]])
    assert float(counts["rejected"]) == 1 and float(counts["rejected_rows"]) == 0


def test_masked_importance_sampling_without_weights():
    """Rejection alone: weight 1 inside the band."""
    prox, behav, mask = _batch()
    weights, _ = correction_weights(prox, behav, mask, reject="token", reject_low=0.5, reject_high=2.0)
    assert _close(weights, [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_sequence_level_rejection_masks_whole_responses():
    prox, behav, mask = _batch()
    seq, counts = correction_weights(prox, behav, mask, weight="token", reject="sequence", reject_high=2.0)
    assert _close(seq, [[1.0, 3.0, 0.5], [0.0, 0.0, 0.0]])  # products 1.5 and 2.4
    assert float(counts["rejected_rows"]) == 1 and float(counts["rejected"]) == 2
    geo, _ = correction_weights(prox, behav, mask, reject="geometric", reject_low=0.9, reject_high=1.2)
    assert _close(geo, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # 1.5^(1/3) = 1.145 in, 2.4^(1/2) = 1.55 out


def test_veto_rejects_a_response_with_one_catastrophic_token():
    prox, behav, mask = _batch()
    behav[0, 1] = LN(3) + 20.0  # the engine found this token e^20 times likelier than the trainer
    weights, counts = correction_weights(prox, behav, mask, weight="token", veto=1e-4)
    assert _close(weights[0], [0.0, 0.0, 0.0]) and _close(weights[1], [0.4, 6.0, 0.0])
    assert float(counts["rejected_rows"]) == 1


def test_off_mask_values_never_leak():
    prox, behav, mask = _batch()
    behav[1, 2] = float("inf")
    weights, counts = correction_weights(prox, behav, mask, weight="sequence", reject="geometric", reject_high=10.0)
    assert torch.isfinite(weights).all() and weights[1, 2] == 0
    assert all(math.isfinite(float(v)) for v in counts.values())


def test_a_nan_on_the_mask_counts_as_the_largest_ratio():
    prox, behav, mask = _batch()
    prox[0, 0] = float("nan")  # a trainer log-prob gone NaN
    weights, counts = correction_weights(prox, behav, mask, weight="token", reject="token", reject_high=5.0)
    assert weights[0, 0] == 0 and float(counts["rejected"]) == 2  # it and rho = 6
    hist = ratio_histogram(log_rho(prox, behav, mask), mask)
    assert float(hist[-1]) == 1 and float(hist.sum()) == 5  # the top bin, not a crash


def test_an_on_policy_batch_reports_a_ratio_of_exactly_1():
    lr = torch.zeros(2, 3, dtype=torch.float64)
    got = histogram_quantiles(ratio_histogram(lr, torch.ones(2, 3, dtype=torch.bool)))
    assert all(v == 1.0 for v in got.values())


def test_ratio_quantiles_from_the_histogram():
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(4, 500, generator=g, dtype=torch.float64) * 0.3
    mask = torch.rand(4, 500, generator=g) < 0.8
    counts = ratio_histogram(log_rho(lr, torch.zeros_like(lr), mask), mask)
    assert counts.shape == (HIST_BINS + 2,) and float(counts.sum()) == float(mask.sum())
    # summing two halves' histograms is the histogram of the whole (how ranks combine)
    halves = ratio_histogram(lr[:2], mask[:2]) + ratio_histogram(lr[2:], mask[2:])
    assert torch.equal(halves, counts)
    want = torch.quantile(lr[mask].exp(), torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64))
    got = histogram_quantiles(counts)
    for q, w in zip(got.values(), want.tolist()):
        assert abs(q / w - 1) < 0.003  # one bin: 0.2% of the ratio


def test_ratio_quantiles_beyond_the_bins_and_empty():
    lr = torch.tensor([[-5.0, 0.0, 5.0]], dtype=torch.float64)
    got = histogram_quantiles(ratio_histogram(lr, torch.ones(1, 3, dtype=torch.bool)), (0.01, 0.5, 0.99))
    assert got[0.01] == pytest.approx(math.exp(-2)) and got[0.99] == pytest.approx(math.exp(2))
    assert got[0.5] == pytest.approx(1.0, rel=2e-3)
    assert all(math.isnan(v) for v in histogram_quantiles(torch.zeros(HIST_BINS + 2)).values())
