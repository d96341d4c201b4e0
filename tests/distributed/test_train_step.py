"""One optimizer step under TP=2, PP=2, DP=2 (dense) and DP=2, EP=2, TP=2+SP (MoE) equals the single-rank step.

Every layout starts from the same weights (saved once by the single-rank run, resharded by
megatron's dist_checkpointing) and sees the same global batch; parameters after the step are
gathered to full tensors the same way.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from layout_utils import full_params, load_model, plain_tensors, rel, save_model
from r1mega.config.schema import ModelConfig, MoEConfig, OptimizerConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, SEQ, GBS, MBS = 128, 16, 8, 2


def model_config(kind: str) -> ModelConfig:
    cfg = ModelConfig(name=kind, arch="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                      num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB, qk_layernorm=True)
    if kind == "moe":
        cfg.moe = MoEConfig(num_experts=4, ffn_hidden_size=32, router_topk=2, aux_loss_coeff=1e-2,
                            token_dispatcher="alltoall")
    return cfg


# Clipping is active (grad norm > 1). Adam's first update is lr * g / (|g| + eps): its slope lr / eps
# turns rounding noise in near-zero gradient elements into update differences; at eps = 1e-8 that
# reaches 5e-5 in single elements, at 1e-6 it stays far below the tolerance.
OPTIMIZER = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0, adam_eps=1e-6)

# name -> (model kind, layout, distributed optimizer)
LAYOUTS = {
    "dense_ref": ("dense", ParallelConfig(), True),
    "dense_tp2": ("dense", ParallelConfig(tp=2), True),
    "dense_pp2": ("dense", ParallelConfig(pp=2), True),
    "dense_dp2": ("dense", ParallelConfig(), True),
    "dense_dp2_plain_opt": ("dense", ParallelConfig(), False),
    "moe_ref": ("moe", ParallelConfig(), True),
    "moe_dp2": ("moe", ParallelConfig(), True),
    "moe_ep2": ("moe", ParallelConfig(ep=2), True),
    "moe_tp2_sp": ("moe", ParallelConfig(tp=2, sequence_parallel=True), True),
}


def _run(names, root: str):
    """On each rank: for each layout, load the initial weights, take one step, gather the result."""
    from megatron.core import parallel_state as ps

    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.pretrain import train_step
    from r1mega.trainer.optimizer import build_optimizer

    batch = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=torch.Generator().manual_seed(31))
    results, init = {}, {}
    try:
        for name in names:
            kind, parallel, distributed = LAYOUTS[name]
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            initialize(parallel, seed=5)
            model = model_config(kind)
            chunks = build_model(model, parallel)
            if name.endswith("_ref"):
                save_model(chunks, f"{root}/{kind}_init")
                init[kind] = plain_tensors(f"{root}/{kind}_init")
            else:
                load_model(chunks, f"{root}/{kind}_init")
            opt = replace(OPTIMIZER, distributed=distributed)
            ddp, optimizer, scheduler = build_optimizer(chunks, model, opt, total_steps=10)
            dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            mine = batch.chunk(dp)[dp_rank]
            metrics = train_step(ddp, optimizer, scheduler, list(mine.split(MBS)), SEQ, MBS)
            results[name] = (metrics, full_params(ddp, f"{root}/{name}_after"))
    finally:
        destroy()
    return results, init


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("step"))
    refs = [n for n in LAYOUTS if n.endswith("_ref")]
    results, init = spawn(1, _run, refs, root)[0]
    results.update(spawn(2, _run, [n for n in LAYOUTS if n not in refs], root)[0][0])
    return results, init


@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.endswith("_ref")])
def test_step_matches_single_rank(steps, name):
    results, init = steps
    kind = LAYOUTS[name][0]
    ref_metrics, ref_params = results[f"{kind}_ref"]
    metrics, params = results[name]
    assert abs(metrics["loss"] - ref_metrics["loss"]) / ref_metrics["loss"] < 1e-6, (metrics, ref_metrics)
    assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"] < 1e-5
    assert ref_metrics["grad_norm"] > OPTIMIZER.clip_grad  # the step clipped
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        got = params[key]
        assert torch.isfinite(got).all(), key
        assert rel(got, ref) < 1e-5, f"{name}: {key} relative error {rel(got, ref):.2e}"
    # The step moved the weights well beyond the tolerance above.
    moved = [rel(ref_params[k], init[kind][k]) for k in ref_params if k in init[kind]]
    assert moved and max(moved) > 1e-4
