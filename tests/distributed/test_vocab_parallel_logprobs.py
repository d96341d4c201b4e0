"""token_logprobs with the vocabulary split over 2 gloo ranks reproduces the unsplit computation.

Each rank holds one contiguous half of the same logits; both compute logp and entropy with one
new_group over the two ranks and backpropagate the same random combination of them. Oracle: the
single-process call on the full vocabulary (itself checked against log_softmax in the unit tests).
"""

from __future__ import annotations

import pytest
import torch

from r1mega.ops.logprobs import token_logprobs
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

ROWS, VOCAB, PAD = 50, 64, 5  # PAD trailing -inf logits, as for masked vocab padding
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def _problem(dtype: torch.dtype, pad: bool):
    """Same logits, targets and loss weights on every rank."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 4
    if pad:
        logits[:, VOCAB - PAD:] = float("-inf")
    targets = torch.randint(0, VOCAB - PAD, (ROWS,), generator=gen)
    weights = torch.randn(2, ROWS, generator=gen, dtype=torch.float64)
    return logits.to(dtype), targets, weights


def _run(logits, targets, weights, vocab_start, group, temperature):
    """(logp, entropy, gradient of w0 . logp + w1 . entropy w.r.t. the given logits)."""
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, targets, tp_group=group, vocab_start=vocab_start,
                               temperature=temperature, with_entropy=True, chunk_rows=16)
    (weights[0].to(logp.dtype) @ logp + weights[1].to(ent.dtype) @ ent).backward()
    return logp.detach(), ent.detach(), x.grad


CASES = [(name, pad, temperature) for name in DTYPES for pad, temperature in ((False, 1.0), (True, 0.7))]


def _rank():
    """This rank's half of the vocabulary for every case: {case: (vocab_start, logp, entropy, grad)}."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        group = dist.new_group([0, 1])
        start = dist.get_rank() * (VOCAB // 2)
        results = {}
        for name, pad, temperature in CASES:
            logits, targets, weights = _problem(DTYPES[name], pad)
            local = logits[:, start:start + VOCAB // 2]
            results[(name, pad, temperature)] = (start, *_run(local, targets, weights, start, group, temperature))
        return results
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    return spawn(2, _rank)  # one launch for all cases: starting ranks dominates the run time


@pytest.mark.parametrize("dtype_name,pad,temperature", CASES)
def test_vocab_split_matches_single_process(ranks, dtype_name, pad, temperature):
    tol = {"fp64": 1e-6, "fp32": 1e-5}[dtype_name]
    logits, targets, weights = _problem(DTYPES[dtype_name], pad)
    ref_logp, ref_ent, ref_grad = _run(logits, targets, weights, 0, None, temperature)
    grad = torch.zeros_like(ref_grad)
    for result in ranks:
        start, logp, ent, local_grad = result[(dtype_name, pad, temperature)]
        for out, ref in ((logp, ref_logp), (ent, ref_ent)):  # replicated on every rank
            assert torch.isfinite(out).all()
            assert ((out - ref).norm() / ref.norm()).item() < tol
        grad[:, start:start + local_grad.shape[1]] = local_grad
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < tol
    if pad:
        assert torch.equal(grad[:, VOCAB - PAD:], torch.zeros(ROWS, PAD, dtype=grad.dtype))


def _candidates():
    """Top-k and several candidates' log-probs with the vocabulary split over a TP=2 pair (megatron's groups)."""
    from megatron.core import parallel_state as ps

    from r1mega.config.schema import ParallelConfig
    from r1mega.ops.logprobs import candidate_logprobs, top_logprobs
    from r1mega.platform.distributed import destroy, initialize

    initialize(ParallelConfig(tp=2), seed=0)
    try:
        logits, _, weights = _problem(torch.float64, False)
        start = ps.get_tensor_model_parallel_rank() * (VOCAB // 2)
        local = logits[:, start:start + VOCAB // 2].clone().requires_grad_(True)
        top, ids = top_logprobs(local, 6)
        chosen = candidate_logprobs(local, ids, temperature=0.7)
        (chosen * weights[0][:, None]).sum().backward()
        return start, top, ids, chosen.detach(), local.grad
    finally:
        destroy()


def test_top_k_and_candidates_over_a_split_vocabulary():
    """The k most likely tokens (each rank's k best gathered, then the best of those) and the log-probs of
    given tokens and of the rest (differentiable) equal the whole vocabulary's log_softmax."""
    def with_rest(logp, ids):  # at ids, then the log of every other token's mass
        return torch.cat([logp.gather(-1, ids), logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1)

    logits, _, weights = _problem(torch.float64, False)
    best_ids = torch.log_softmax(logits, -1).topk(6, dim=-1).indices
    best = with_rest(torch.log_softmax(logits, -1), best_ids)
    full = logits.clone().requires_grad_(True)
    (with_rest(torch.log_softmax(full / 0.7, -1), best_ids) * weights[0][:, None]).sum().backward()
    for start, top, ids, chosen, grad in spawn(2, _candidates):
        assert ids.equal(best_ids) and top.shape == (ROWS, 7) and torch.allclose(top, best, atol=1e-12)
        assert torch.allclose(chosen, with_rest(torch.log_softmax(logits / 0.7, -1), best_ids), atol=1e-12)
        assert torch.allclose(grad, full.grad[:, start:start + VOCAB // 2], atol=1e-12)
