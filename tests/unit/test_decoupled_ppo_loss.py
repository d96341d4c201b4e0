"""Decoupled PPO (AReaL) as the trainer computes it, on a crafted batch of a partial rollout: the
first tokens of each response were sampled under policy version 0, the rest under version 1
after a weight update, so the behaviour log-probs come from two policies. The loss and its
gradient equal values worked out by hand: per token, rho = pi_prox / pi_behaviour (0 above 5),
r = pi / pi_prox, term = -rho * min(r A, clip(r, 1 - 0.2, 1 + 0.2) A), token mean."""

from __future__ import annotations

import math

import torch

from r1mega.config.loader import load_config
from r1mega.trainer.rl.loss import Surrogate, off_policy_weights, policy_terms

LN = math.log


def test_decoupled_ppo_loss_on_a_partial_rollout_equals_hand_values():
    cfg = load_config(["correction=decoupled", "algorithm.kl_beta=0", "algorithm.loss_agg=token-mean"])
    c = cfg.algorithm.correction
    assert (c.weight, c.reject, c.reject_high) == ("token", "token", 5.0)
    # two responses of 3 and 2 tokens (a padded column); versions per token: [0, 0, 1] and [0, 1]
    behav = torch.tensor([[LN(0.2), LN(0.5), LN(0.4)], [LN(0.1), LN(0.3), 0.0]], dtype=torch.float64)
    prox = torch.tensor([[LN(0.3), LN(0.5), LN(0.2)], [LN(0.6), LN(0.3), float("nan")]], dtype=torch.float64)
    pi = torch.tensor([[LN(0.33), LN(0.7), LN(0.2)], [LN(0.3), LN(0.27), 0.0]], dtype=torch.float64,
                      requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # rho: 1.5, 1, 0.5 | 6 (> 5: dropped), 1;  r: 1.1, 1.4, 1 | 0.5, 0.9
    # terms: -1.5 * min(1.1, 1.1) = -1.65; -1 * min(1.4, 1.2) = -1.2; -0.5 * 1 = -0.5;
    #        0 (dropped); -1 * min(0.9 * -2, 0.9 * -2) = 1.8
    hand_loss = (-1.65 - 1.2 - 0.5 + 0.0 + 1.8) / 5
    # d/dlog pi of -rho r A where unclipped (r = pi / pi_prox): -rho r A; the clipped token has none
    hand_grad = torch.tensor([[-1.5 * 1.1, 0.0, -0.5 * 1.0], [0.0, -1.0 * 0.9 * -2.0, 0.0]],
                             dtype=torch.float64) / 5
    weights, counts = off_policy_weights(prox, behav, mask, c)
    terms = policy_terms(pi, prox, None, adv, mask, weights, Surrogate.of(cfg.algorithm), mode="token-mean")
    assert abs(terms.loss.item() - hand_loss) < 1e-12
    terms.loss.backward()
    torch.testing.assert_close(pi.grad, hand_grad, rtol=0, atol=1e-12)
    assert float(counts["rejected"]) == 1
