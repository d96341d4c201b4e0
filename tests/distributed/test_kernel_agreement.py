"""Tensor-parallel ranks take the same log-prob path: the kernel's (one pair of all-reduces over the
whole batch) or the reference's (a pair per chunk of rows), never one each, which would leave
them waiting in collectives that do not match.

On gloo, with the CUDA extension emulated (tests/logprob_kernel_emulation.py: per-row partials of
the slice in the kernel's fp32 order; the gradient written into the logits): one rank without the build, or one whose kernel
fails its check, sends the whole group down the reference; with both kernels sound the group
takes the kernel path. Every case gives the single-process float64 answer.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

ROWS, VOCAB, CHUNK = 10, 96, 4  # more rows than a reference chunk: the two paths' collectives differ


def _inputs():
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(ROWS, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g)
    weights = torch.randn(ROWS, generator=g)
    return logits, targets, weights


def _run(built: list, wrong: list, temperature: float = 0.7):
    """token_logprobs at TP=2 where rank r has the build (built[r]) and a sound kernel (not wrong[r]):
    (log-probs, gradient of the full logits, kernel calls on the real batch)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import r1mega.ops.logprobs as logprobs
    import r1mega.ops.logprobs_kernel as logprobs_kernel
    from r1mega.config.schema import ParallelConfig
    from r1mega.platform.distributed import running

    import logprob_kernel_emulation as emulation

    with running(ParallelConfig(tp=2), seed=1):
        rank = dist.get_rank()
        rows_seen: list = []  # rows of each kernel launch (the first-use check runs its own)
        module = emulation.kernels(wrong_temperature=wrong[rank], rows_seen=rows_seen)
        logprobs_kernel.load = lambda: module
        logprobs.available = lambda *tensors: built[rank]
        logits, targets, weights = _inputs()
        half = VOCAB // 2
        mine = logits[:, rank * half:(rank + 1) * half].clone().requires_grad_(True)
        group = ps.get_tensor_model_parallel_group()
        logp, entropy = logprobs.token_logprobs(mine * 1.0, targets, group, rank * half, temperature,
                                                with_entropy=True, chunk_rows=CHUNK)
        ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
        grads = [torch.empty_like(mine.grad) for _ in range(2)]
        dist.all_gather(grads, mine.grad.contiguous(), group=group)
        return logp.detach(), torch.cat(grads, dim=1), rows_seen.count(ROWS)


def _reference(temperature: float = 0.7):
    from r1mega.ops.logprobs import token_logprobs

    logits, targets, weights = _inputs()
    x = logits.double().requires_grad_(True)
    logp, entropy = token_logprobs(x, targets, temperature=temperature, with_entropy=True)
    ((logp * weights.double()).sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), x.grad


@pytest.mark.parametrize("built,wrong,kernel", [
    ([True, False], [False, False], False),  # rank 1 has no build
    ([True, True], [False, True], False),  # rank 1's kernel fails its check
    ([True, True], [False, False], True),  # both sound: the kernel path
], ids=["one_unbuilt", "one_check_failed", "both_sound"])
def test_tensor_parallel_ranks_agree_on_the_path(built, wrong, kernel):
    want_logp, want_grad = _reference()
    for logp, grad, real_calls in spawn(2, _run, built, wrong, timeout=300):
        assert real_calls == (1 if kernel else 0)  # one kernel launch for all rows, or none
        assert float((logp.double() - want_logp).abs().max()) < 1e-5
        assert float((grad.double() - want_grad).norm() / want_grad.norm()) < 1e-5
