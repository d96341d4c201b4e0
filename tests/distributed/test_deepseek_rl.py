"""GRPO on the tiny DeepSeek-V3 model (multi-latent attention, DeepSeekMoE with its expert bias, an MTP layer): two
steps with the experts split over two ranks (TP=2 x EP=2, so the same data-parallel rank holds every
prompt), TP=2 alone, or the layers over two pipeline stages, take the single rank's steps, from one set of
weights.
(EP=2 alone would take two data-parallel ranks, which sample other prompts; EP=2 x CP=2 needs
Transformer Engine for MLA's context parallelism.)"""

from __future__ import annotations

import pytest
import torch

from rl_helpers import run
from test_rl_run import ALGO, COMPARED, _close, _save_init
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed


# a load-balancing loss large enough to move the router: under sequence parallelism the packs of the
# TP pair end in padding, which must count neither for it nor for the expert bias
MODEL = ["model=tiny_dsv3", "model.num_query_groups=4", "model.moe.aux_loss_coeff=0.05"]


LAYOUTS = {  # ranks, overrides
    "tp2ep2": (2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),  # the dense layer on one stage, the MoE layer on the other
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),  # MLA under TP needs SP
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_steps_match_single_rank(tmp_path, layout):
    init = str(tmp_path / "init")
    spawn(1, _save_init, init, MODEL)
    common = [*MODEL, *ALGO, f"model.mcore_path={init}", "trainer.steps=2"]
    ref = spawn(1, run, common, str(tmp_path / "ref"), 1)[0]
    ranks, extra = LAYOUTS[layout]
    split = spawn(ranks, run, [*common, *extra], str(tmp_path / layout), ranks)[0]
    assert [m["step"] for m in split] == [1, 2]
    for a, b in zip(split, ref):
        for key in (*COMPARED, "mtp/loss"):  # the MTP layer (its own MoE layer, on the last stage) too
            assert _close(a[key], b[key], 1e-4, key), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert any(m["grad_norm"] > 0 for m in ref) and any(m["advantage/abs_mean"] > 0 for m in ref)


def test_expert_parallel_over_data_parallel_ranks_equals_ep1(tmp_path):
    """EP=2 alone borrows the data-parallel ranks: two of them (other prompts than one rank's), four experts
    each, take the steps of the same two data-parallel ranks each holding all eight experts."""
    init = str(tmp_path / "init")
    spawn(1, _save_init, init, MODEL)
    common = [*MODEL, *ALGO, f"model.mcore_path={init}", "trainer.steps=2"]
    ep1 = spawn(2, run, common, str(tmp_path / "ep1"), 2)[0]
    ep2 = spawn(2, run, [*common, "parallel.ep=2"], str(tmp_path / "ep2"), 2)[0]
    assert [m["step"] for m in ep2] == [1, 2]
    for a, b in zip(ep2, ep1):
        for key in (*COMPARED, "mtp/loss"):
            assert _close(a[key], b[key], 1e-4, key), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert all(m["grad_norm"] > 0 for m in ep2)


def _reference_takes_the_bias(folder: str):
    import torch

    from rl_helpers import config
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.model_setup import copy_weights

    cfg = config(folder, MODEL)
    initialize(cfg.parallel, seed=5)
    try:
        policy, ref = build_model(cfg.model, cfg.parallel), build_model(cfg.model, cfg.parallel)
        biases = [b for n, b in policy[0].named_buffers() if n.endswith("router.expert_bias")]
        for b in biases:
            b.copy_(torch.randn_like(b))
        copy_weights(policy, ref)
        theirs = [b for n, b in ref[0].named_buffers() if n.endswith("router.expert_bias")]
        return len(biases), all(torch.equal(a, b) for a, b in zip(biases, theirs))
    finally:
        destroy()


def test_kl_reference_routes_as_the_policy(tmp_path):
    """The reference copy (its start, and R1's resets) takes the routers' expert bias, a buffer, with the weights."""
    count, equal = spawn(1, _reference_takes_the_bias, str(tmp_path))[0]
    assert count == 2 and equal  # the tests' two-layer tiny_dsv3: a dense layer, an MoE one, an MoE MTP layer


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_expert_bias_moves_by_its_update_rate(tmp_path, rate):
    """DeepSeek-V3's aux-loss-free balancing: after each optimizer step every expert's bias moved by exactly
    the rate (toward balance) or not at all (an expert at the mean load); rate 0 freezes it. Read from the
    exported HF checkpoint's e_score_correction_bias, starting from 0."""
    import glob

    from safetensors.torch import load_file

    init = str(tmp_path / "init")
    spawn(1, _save_init, init, MODEL)
    spawn(1, run, [*MODEL, *ALGO, f"model.mcore_path={init}", "trainer.steps=2", "trainer.export_hf=true",
                   f"model.moe.expert_bias_update_rate={rate}"], str(tmp_path / "run"), 1)
    tensors = {}
    for f in glob.glob(str(tmp_path / "run" / "hf" / "*.safetensors")):
        tensors.update(load_file(f))
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    steps = 2 * 2  # trainer.steps x algorithm.minibatches optimizer steps
    if rate == 0:
        assert torch.equal(bias, torch.zeros_like(bias))
        return
    multiples = bias / rate
    assert torch.allclose(multiples, multiples.round(), atol=1e-4)  # whole steps of the rate
    assert multiples.abs().max() <= steps and multiples.abs().max() >= 1
    assert (multiples < 0).any() and (multiples > 0).any()  # over-loaded experts down, under-loaded up


def _down_projections(folder: str, tp: int):
    from rl_helpers import config
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    extra = ["model=tiny_dsv3", "model.num_query_groups=4", "model.init_method_std=0.02"]
    if tp > 1:
        extra += ["parallel.tp=2", "parallel.sequence_parallel=true"]
    cfg = config(folder, extra, world_size=tp)
    initialize(cfg.parallel, seed=5)
    try:
        chunk = build_model(cfg.model, cfg.parallel)[0]
        return {n: p.detach().clone() for n, p in chunk.named_parameters() if "down_proj" in n}
    finally:
        destroy()


def test_down_projections_start_as_the_init_method_says(tmp_path):
    """MLA's duplicated down-projections (megatron's local Linear, which ignores init_method) are drawn
    from the configured normal, and start equal on both tensor-parallel ranks."""
    one = spawn(1, _down_projections, str(tmp_path / "a"), 1)[0]
    two = spawn(2, _down_projections, str(tmp_path / "b"), 2)
    assert len(one) == 6  # q and kv down-projections of both layers and of the MTP layer
    for name, weight in one.items():
        assert abs(float(weight.std()) - 0.02) < 0.004, (name, float(weight.std()))
        assert torch.equal(two[0][name], two[1][name]), name


def test_rollout_workers_decode_without_the_mtp_layer(tmp_path):
    """Rollout workers build the model without its MTP layer and take the decoder's weights only; with
    staleness 0 their steps are the synchronous run's (the trainer still trains the MTP layer)."""
    from test_async_rl import ASYNC, TIMING, _run_at_async_threads

    common = [*MODEL, *ALGO, "trainer.steps=2"]
    sync = spawn(1, _run_at_async_threads, common, str(tmp_path / "sync"))[0]
    got = spawn(1, _run_at_async_threads, [*common, *ASYNC], str(tmp_path / "async"))[0]
    for a, b in zip(got, sync):
        shared = [k for k in b if not k.startswith(TIMING) and k != "logprob_gap"]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
        assert a["mtp/loss"] > 0
