"""RL micro-batches packed (THD) give the loss and every gradient of the same rows right-padded: on
one rank, under TP=2 with sequence parallelism (the pack padded to the TP multiple), under PP=2
(packs of different lengths cross the stage boundary), and under EP=2 on a MoE model. Rows re-dealt
over data-parallel ranks by tokens give the optimizer step of one rank holding them all."""

from __future__ import annotations

import pytest
import torch

from types import SimpleNamespace

from layout_utils import full_params, load_model, rel, save_model
from r1mega.config.schema import (AlgorithmConfig, CorrectionConfig, FP8Config, ModelConfig, MoEConfig,
                                  OptimizerConfig, ParallelConfig, TrainerConfig)
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="t", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, head_dim=16, vocab_size=128, qk_layernorm=True, init_method_std=0.05)
MOE = ModelConfig(**{**MODEL.__dict__, "name": "moe", "moe": MoEConfig(num_experts=4, ffn_hidden_size=32,
                                                                        router_topk=2, token_dispatcher="alltoall",
                                                                        aux_loss_coeff=0.05)})
GROUPS = ([0, 1, 2], [3, 4])  # two micro-batches; lengths differ within and between them


def step_batch(seed: int = 3):
    """Rows of varied prompt and response lengths, with old, reference and rollout log-probs."""
    from r1mega.rollout.types import Rollouts
    from r1mega.trainer.rl.batch import StepBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 4, 12, 7, 5)]
    responses = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 11, 3, 6, 1)]
    logprobs = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    rollouts = Rollouts(prompts, responses, logprobs, ["stop"] * 5, [0, 0, 1, 1, 1])
    batch = StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75]))
    batch.old_logp = [lp - 0.1 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]  # some clipping
    batch.ref_logp = [lp - 0.3 * torch.rand(len(lp), generator=g) for lp in batch.rollout_logp]
    return batch


def _loss_and_grads(parallel: ParallelConfig, model: ModelConfig, loss_agg: str):
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.forward_backward import run_schedule
    from r1mega.trainer.rl.batch import collate, pack
    from r1mega.trainer.rl.loss import LossSettings, policy_loss

    initialize(parallel, seed=11)
    try:
        # float64, so that the comparison sees the layouts and not float32's summation order (a
        # layer-norm weight's gradient sums over every token, in another order per layout)
        chunks = [c.double() for c in build_model(model, parallel)]
        get_model_config(chunks[0]).variable_seq_lengths = True
        get_model_config(chunks[0]).pipeline_dtype = torch.float64
        batch = step_batch()
        multiple = parallel.tp if parallel.sequence_parallel else 1
        layouts = {"padded": [collate(batch, rows, multiple) for rows in GROUPS],
                   "packed": [pack(batch, rows, multiple) for rows in GROUPS]}
        algo = AlgorithmConfig(kl_beta=0.1, entropy_coeff=0.01, loss_agg=loss_agg,
                               # old / rollout in [0.905, 1]: token weights, rows of low geometric mean rejected whole
                               correction=CorrectionConfig(weight="token", weight_cap=2.0, reject="geometric",
                                                           reject_low=0.955))  # rows 0 and 1 (0.954, 0.951)
        settings = LossSettings(algo, 16, 0.9, float(batch.response_tokens(range(len(batch)))), float(len(batch)))
        out = {"packed_lengths": [m.tokens.shape for m in layouts["packed"]]}
        for name, micro in layouts.items():
            for p in chunks[0].parameters():
                p.grad = None
            reports = run_schedule(chunks, micro, partial(policy_loss, s=settings, scale=2.0), forward_only=False)
            grads = {n: p.grad.clone() for n, p in chunks[0].named_parameters() if p.grad is not None}
            for n, p in chunks[0].named_parameters():
                if getattr(p, "sequence_parallel", False) and n in grads:
                    # each TP rank holds the part from its slice of the sequence, and packed and padded
                    # rows slice it differently; the optimizer step all-reduces these (megatron's
                    # finalize_model_grads), so their sums are what must agree
                    torch.distributed.all_reduce(grads[n], group=ps.get_tensor_model_parallel_group())
            out[name] = {"loss": float(sum(r["sums"][0] for r in reports)) if reports else None,
                         "stats": sum(r["sums"] for r in reports) if reports else None, "grads": grads}
        return out
    finally:
        destroy()


# DeepSeek-V3's router: sigmoid scores, expert bias (counted in training steps), no padding mask
BIASED = ModelConfig(**{**MOE.__dict__, "name": "biased", "moe": MoEConfig(
    num_experts=4, ffn_hidden_size=32, router_topk=2, token_dispatcher="alltoall", score_function="sigmoid",
    expert_bias=True)})
CASES = [(ParallelConfig(), 1, MODEL), (ParallelConfig(tp=2, sequence_parallel=True), 2, MODEL),
         (ParallelConfig(pp=2), 2, MODEL), (ParallelConfig(ep=2), 2, MOE),
         (ParallelConfig(tp=2, pp=2, sequence_parallel=True), 4, MOE), (ParallelConfig(), 1, BIASED)]


@pytest.mark.parametrize("parallel,nproc,model", CASES,
                         ids=["single", "tp2_sp", "pp2", "ep2", "moe_tp2_sp_pp2", "expert_bias"])
def test_packed_equals_padded_loss_and_gradients(parallel, nproc, model):
    from r1mega.trainer.rl.loss import STAT_SUMS

    for r in spawn(nproc, _loss_and_grads, parallel, model, "seq-mean-token-mean"):
        if parallel.sequence_parallel:
            assert all(shape[1] % parallel.tp == 0 for shape in r["packed_lengths"])
        if r["padded"]["loss"] is not None:  # the last pipeline stage
            assert r["packed"]["loss"] == pytest.approx(r["padded"]["loss"], rel=1e-6)
            # every reported sum (pg loss, KL, entropy, clip fraction, ratio, log-prob gap, tokens)
            assert torch.allclose(r["packed"]["stats"], r["padded"]["stats"], rtol=1e-6, atol=1e-9)
            rejected = float(r["padded"]["stats"][STAT_SUMS.index("off_policy/rejected_share")])
            assert 0 < rejected < float(r["padded"]["stats"][-1])  # the correction bites, not everywhere
        grads = r["padded"]["grads"]
        assert grads.keys() == r["packed"]["grads"].keys() and len(grads) > 4
        for name, g in grads.items():
            assert rel(r["packed"]["grads"][name], g) < 1e-6, name


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_every_aggregation_packed_equals_padded(loss_agg):
    r = spawn(1, _loss_and_grads, ParallelConfig(), MODEL, loss_agg)[0]
    assert r["packed"]["loss"] == pytest.approx(r["padded"]["loss"], rel=1e-6)
    for name, g in r["padded"]["grads"].items():
        assert rel(r["packed"]["grads"][name], g) < 1e-6, name


def _step_on_balanced_rows(root: str, loss_agg: str, reference: bool):
    """One optimizer step over all rows: on one rank, or on DP=2 with the four longest rows first on
    rank 0 and then re-dealt by tokens. Returns (metrics, parameters after, tokens per rank before/after)."""
    from functools import partial

    from megatron.core import parallel_state as ps

    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, dp_sum, initialize
    from r1mega.trainer.forward_backward import train_step
    from r1mega.trainer.optimizer import build_optimizer
    from r1mega.trainer.rl.batch import balance_over_dp, micro_batches
    from r1mega.trainer.rl.loss import LossSettings, policy_loss, reduce_stats

    parallel = ParallelConfig()
    initialize(parallel, seed=11)
    try:
        chunks = build_model(MODEL, parallel)
        if reference:
            save_model(chunks, f"{root}/init")
        else:
            load_model(chunks, f"{root}/init")
        ddp, optimizer, scheduler = build_optimizer(chunks, MODEL, OptimizerConfig(lr=1e-3, adam_eps=1e-6), 10)
        whole = step_batch()
        dp, me = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        longest_first = sorted(range(len(whole)), key=lambda i: -len(whole.tokens[i]))
        rows = [longest_first[:4], longest_first[4:]][me] if dp == 2 else list(range(len(whole)))
        batch = whole.select(rows)
        before = sum(batch.model_lengths())
        batch = balance_over_dp(batch)
        after = sum(batch.model_lengths())
        # what the log-prob passes would give: a function of each row alone
        batch.old_logp = [lp * 1.05 for lp in batch.rollout_logp]
        batch.ref_logp = [lp * 0.9 for lp in batch.rollout_logp]
        cfg = SimpleNamespace(trainer=TrainerConfig(micro_batch_tokens=24), model=SimpleNamespace(fp8=FP8Config()),
                              parallel=parallel)
        mine = list(range(len(batch)))
        micro = micro_batches(cfg, batch, mine)
        tokens, seqs = dp_sum([batch.response_tokens(mine), len(mine)])
        algo = AlgorithmConfig(kl_beta=0.1, entropy_coeff=0.01, loss_agg=loss_agg)
        settings = LossSettings(algo, 16, 1.0, tokens, seqs)
        out, grad_norm, _ = train_step(ddp, optimizer, scheduler, micro,
                                       partial(policy_loss, s=settings, scale=float(len(micro) * dp)))
        metrics = {**reduce_stats(out)[0], "grad_norm": grad_norm}
        return metrics, full_params(ddp, f"{root}/{loss_agg}_{dp}_after"), (before, after)
    finally:
        destroy()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_balanced_data_parallel_step_equals_one_rank(tmp_path, loss_agg):
    ref_metrics, ref_params, _ = spawn(1, _step_on_balanced_rows, str(tmp_path), loss_agg, True)[0]
    results = spawn(2, _step_on_balanced_rows, str(tmp_path), loss_agg, False)
    before = [r[2][0] for r in results]
    after = [r[2][1] for r in results]
    assert sum(before) == sum(after) and max(after) - min(after) < max(before) - min(before)
    metrics, params, _ = results[0]
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        assert rel(params[key], ref) < 1e-5, key
