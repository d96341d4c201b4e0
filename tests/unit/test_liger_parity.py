"""r1mega's GRPO loss path (lm_head logits -> r1mega.ops.logprobs -> r1mega.trainer.rl.loss)
against Liger-Kernel's fused-linear GRPO loss, an outside implementation of the same loss that
never materialises the logits: loss and gradients w.r.t. the hidden states and the lm_head
weight, with clipping active, the k3 KL against given reference log-probs, and each of Liger's
loss types mapped to r1mega's aggregation (PyTorch on the CPU: Liger's chunked loss uncompiled).
"""

from __future__ import annotations

import pytest
import torch

from r1mega.trainer.rl.loss import Surrogate, policy_terms
from r1mega.ops.logprobs import token_logprobs

chunked = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V, MAX_LEN = 4, 9, 32, 300, 16
AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # both clips active
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return hidden, weight, ids, mask, old, ref, adv


def _r1mega(batch, loss_type, beta):
    hidden, weight, ids, mask, old, ref, adv = batch
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, _ = token_logprobs((h @ w.T).reshape(-1, V), ids.reshape(-1))
    terms = policy_terms(logp.view(B, T), old, ref, adv, mask.bool(), None,
                         Surrogate(0.2, 0.28, None, "token", beta, "k3"), mode=AGGREGATION[loss_type],
                         norm_length=MAX_LEN)
    terms.loss.backward()
    return terms.loss.detach(), h.grad, w.grad


def _liger(batch, loss_type, beta):
    hidden, weight, ids, mask, old, ref, adv = batch
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_fn = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=2,
                                               epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                               max_completion_length=MAX_LEN)
    loss, _ = loss_fn(h, w, ids, mask, adv, ref_per_token_logps=ref if beta > 0 else None, old_per_token_logps=old)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", list(AGGREGATION))
def test_loss_and_gradients_equal_ligers(loss_type, beta):
    batch = _batch(seed=len(loss_type) + int(beta * 100))
    ours, theirs = _r1mega(batch, loss_type, beta), _liger(batch, loss_type, beta)
    for name, a, b in zip(("loss", "d hidden", "d lm_head"), ours, theirs):
        # Liger accumulates its loss in float32 whatever the input dtype
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-6, atol=1e-7, msg=name)
    assert ours[1].abs().sum() > 0
