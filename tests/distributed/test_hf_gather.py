"""The whole model as HF tensors on every rank (the weight sync's source) under TP, PP, EP and DP
equals the single-rank HF export of the same weights, tensor for tensor, on every rank; sent to
one rank only (asynchronous rollouts' weight pushes), it is there whole and nowhere else."""

from __future__ import annotations

import pytest
import torch

from layout_utils import load_model, save_model
from r1mega.config.schema import ModelConfig, MoEConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(name="m", arch="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=128, qk_layernorm=True,
                    moe=MoEConfig(num_experts=4, ffn_hidden_size=32, router_topk=2))
LAYOUTS = {"tp2": ParallelConfig(tp=2, sequence_parallel=True), "pp2": ParallelConfig(pp=2),
           "ep2": ParallelConfig(ep=2), "dp2": ParallelConfig()}


def _hf(layout: str, folder: str):
    from r1mega.checkpoint.hf_convert import iter_hf_tensors
    from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors
    from r1mega.models.builder import build_model
    import torch.distributed as dist

    from r1mega.platform.distributed import running

    parallel = LAYOUTS.get(layout, ParallelConfig())
    with running(parallel, seed=3):
        chunks = build_model(MODEL, parallel)
        if layout == "ref":
            save_model(chunks, folder)
            return {n: t.clone() for n, t, _ in iter_hf_tensors(chunks, MODEL)}
        load_model(chunks, folder)
        plan = make_plan(chunks, MODEL)
        names = [e.name for e in plan.entries()]
        got = {n: t.clone() for n, t in world_hf_tensors(chunks, MODEL, plan)}
        # sent to the last rank alone: there every tensor, elsewhere none
        last = {n: t.clone() for n, t in world_hf_tensors(chunks, MODEL, plan, dst=dist.get_world_size() - 1)}
        return names, got, last


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("gather") / "init")
    return folder, spawn(1, _hf, "ref", folder)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_gets_the_single_rank_export(reference, layout):
    folder, ref = reference
    for rank, (names, got, last) in enumerate(spawn(2, _hf, layout, folder)):
        assert len(names) == len(set(names)) == len(ref)  # each HF tensor exactly once
        assert got.keys() == ref.keys()
        for name, tensor in ref.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert last == {} if rank == 0 else last.keys() == ref.keys()
        for name, tensor in last.items():
            assert torch.equal(tensor, ref[name]), name
