"""Logits of the response window only (MicroBatch.logits_from) give the RL loss and gradients of
full logits: on one rank, under TP=2 with sequence parallelism (the hook gathers the sequence
and must not reduce the gradient twice) and under PP=2."""

from __future__ import annotations

import pytest
import torch

from layout_utils import rel
from r1mega.config.schema import AlgorithmConfig, ModelConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="t", arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=128, init_method_std=0.05)


def _batch():
    from r1mega.rollout.types import Rollouts
    from r1mega.trainer.rl.batch import StepBatch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (int(n),), generator=g).tolist() for n in (9, 6, 12, 7)]
    responses = [torch.randint(1, 128, (int(n),), generator=g).tolist() for n in (5, 8, 3, 6)]
    logprobs = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    rollouts = Rollouts(prompts, responses, logprobs, ["stop"] * 4, [0, 0, 1, 1])
    batch = StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -0.5, 0.25, -1.0]))
    batch.old_logp = [lp - 0.1 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]  # some clipping
    batch.ref_logp = [lp - 0.3 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]
    return batch


def _full(m):
    """The same micro-batch with per-token fields over every position (no window)."""
    from r1mega.trainer.rl.batch import MicroBatch

    pad = lambda t, v=0: None if t is None else torch.cat([t.new_full((t.size(0), m.logits_from), v), t], 1)  # noqa
    return MicroBatch(m.rows, m.tokens, pad(m.targets), pad(m.mask, False), m.advantages, pad(m.rollout_logp),
                      pad(m.old_logp), pad(m.ref_logp), 0)


def _loss_and_grads(parallel: ParallelConfig):
    from functools import partial

    from megatron.core.utils import get_model_config

    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.rl.batch import collate
    from r1mega.trainer.rl.loss import LossSettings, policy_loss
    from r1mega.trainer.forward_backward import run_schedule

    initialize(parallel, seed=11)
    try:
        chunks = build_model(MODEL, parallel)
        get_model_config(chunks[0]).variable_seq_lengths = True
        batch = _batch()
        multiple = parallel.tp if parallel.sequence_parallel else 1
        windowed = [collate(batch, rows, multiple) for rows in ([0, 1], [2, 3])]
        assert [m.logits_from for m in windowed] == [5, 6]
        tokens = float(sum(m.mask.sum() for m in windowed))
        settings = LossSettings(AlgorithmConfig(kl_beta=0.1, entropy_coeff=0.01), 8, 1.0, tokens, 4.0)
        out = {}
        for name, micro in (("window", windowed), ("full", [_full(m) for m in windowed])):
            for p in chunks[0].parameters():
                p.grad = None
            reports = run_schedule(chunks, micro, partial(policy_loss, s=settings, scale=2.0), forward_only=False)
            out[name] = {"loss": float(sum(r["sums"][0] for r in reports)) if reports else None,
                         "grads": {n: p.grad.clone() for n, p in chunks[0].named_parameters() if p.grad is not None}}
        return out
    finally:
        destroy()


@pytest.mark.parametrize("parallel,nproc", [(ParallelConfig(), 1), (ParallelConfig(tp=2, sequence_parallel=True), 2),
                                            (ParallelConfig(pp=2), 2)], ids=["single", "tp2_sp", "pp2"])
def test_window_equals_full_logits(parallel, nproc):
    for r in spawn(nproc, _loss_and_grads, parallel):
        if r["full"]["loss"] is not None:  # the last pipeline stage
            assert r["window"]["loss"] == pytest.approx(r["full"]["loss"], rel=1e-6)
        grads = r["full"]["grads"]
        assert grads.keys() == r["window"]["grads"].keys() and len(grads) > 4
        for name, g in grads.items():
            assert rel(r["window"]["grads"][name], g) < 1e-6, name
