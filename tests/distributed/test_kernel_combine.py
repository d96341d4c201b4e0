"""The Python half of the CUDA log-prob path on CPU: per-slice partials, as the kernel computes
them (emulated here in float64), combined across a TP=2 vocab split by `combine`, give the
unsplit reference's log-probs, log-sum-exp and entropy, -inf vocab padding included."""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

V, N, T = 50, 12, 0.7


def _problem():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    logits[:, -3:] = float("-inf")  # vocab padding, all on the second slice
    logits[5, 25:] = float("-inf")  # a row whose second slice is empty
    targets = torch.randint(0, V - 3, (N,), generator=g)
    targets[5] = 3
    return logits, targets


def _partials(z_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float):
    """What kernels/csrc/grpo_logprobs.cu returns per row: max, sum-exp, entropy sum, target logit."""
    z = z_logits * inv_temp
    m = z.amax(-1)
    safe = torch.where(torch.isinf(m), 0.0, m).unsqueeze(-1)
    e = torch.where(torch.isinf(z), 0.0, (z - safe).exp())
    b = torch.where(torch.isinf(z), 0.0, (z - safe) * e).sum(-1)
    local = targets - vocab_start
    inside = (local >= 0) & (local < z.shape[-1])
    zy = torch.where(inside, z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1), 0.0)
    return m, e.sum(-1), b, zy


def _rank():
    import torch.distributed as dist

    from r1mega.config.schema import ParallelConfig
    from r1mega.ops.logprobs import token_logprobs
    from r1mega.ops.logprobs_kernel import combine
    from r1mega.platform.distributed import running

    logits, targets = _problem()
    with running(ParallelConfig(), seed=0):
        rank, half = dist.get_rank(), V // 2
        mine = logits[:, rank * half:(rank + 1) * half]
        got = combine(*_partials(mine, targets, rank * half, 1 / T), targets, rank * half, half, dist.group.WORLD)
        ref_logp, ref_ent = token_logprobs(logits, targets, temperature=T, with_entropy=True)
        one = combine(*_partials(logits, targets, 0, 1 / T), targets, 0, V, None)
        return got, one, (ref_logp, torch.logsumexp(logits / T, -1), ref_ent)


def test_combined_partials_equal_the_reference():
    for got, one, ref in spawn(2, _rank):
        for split, whole, expected, name in zip(got, one, ref, ("logp", "lse", "entropy")):
            assert torch.allclose(split, expected, rtol=1e-12, atol=1e-12), name
            assert torch.allclose(whole, expected, rtol=1e-12, atol=1e-12), name
