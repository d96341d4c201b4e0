"""MoE token dispatchers on gloo: EP=2 and TP=2 + sequence parallel reproduce the single-rank model.

Oracle: the same tiny Qwen3-MoE GPTModel (4 experts, top-2) on one rank. Its weights are saved
in HF layout and loaded into every layout, so all layouts hold the same model. Each layout
returns its logits and every parameter gradient gathered to full HF tensors (experts by global
expert index). Under EP=2 the world is also data-parallel (DP=2): rank r takes batch rows
[2r, 2r+2), and dense gradients are summed over DP, as DDP would (with a summed loss).
"""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig, MoEConfig, ParallelConfig
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

BATCH, SEQ, VOCAB = 4, 16, 128


def _model(dispatcher: str) -> ModelConfig:
    return ModelConfig(name="tiny-moe", arch="qwen3_moe", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB, qk_layernorm=True,
                       moe=MoEConfig(num_experts=4, ffn_hidden_size=32, router_topk=2,
                                     token_dispatcher=dispatcher))


def _run(tp: int, ep: int, dispatcher: str, hf_dir: str, save: bool):
    """Forward + backward on this rank; returns (row offset, logits, {hf name: full gradient})."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from r1mega.checkpoint.hf_convert import iter_hf_tensors, load_hf_weights, save_hf
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize

    parallel = ParallelConfig(tp=tp, ep=ep, sequence_parallel=tp > 1)
    cfg = _model(dispatcher)
    initialize(parallel, seed=1)
    try:
        model = build_model(cfg, parallel)[0]
        if save:
            save_hf([model], cfg, hf_dir)
        else:
            load_hf_weights([model], cfg, hf_dir)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        rows = BATCH // ps.get_data_parallel_world_size()
        start = ps.get_data_parallel_rank() * rows
        ids, labels = ids[start:start + rows], labels[start:start + rows]
        position_ids = torch.arange(SEQ).expand(rows, SEQ)
        logits = gather_from_tensor_model_parallel_region(model(ids, position_ids, None))
        F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum").backward()
        with torch.no_grad():
            for p in model.parameters():
                grad = p.grad
                if tp > 1 and getattr(p, "sequence_parallel", False):  # norms, router under SP
                    dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
                if getattr(p, "allreduce", True):  # dense: sum over data-parallel replicas
                    dist.all_reduce(grad, group=ps.get_data_parallel_group())
                p.copy_(grad)  # gather the gradients with the weight exporter
            grads = {name: t.clone() for name, t, _ in iter_hf_tensors([model], cfg)}
        return start, logits.detach(), grads
    finally:
        destroy()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("moe") / "hf")
    _, logits, grads = spawn(1, _run, 1, 1, "alltoall", hf_dir, True)[0]
    return hf_dir, logits, grads


LAYOUTS = [(1, 2, "alltoall"), (2, 1, "alltoall"), (2, 2, "alltoall"), (1, 2, "allgather")]


@pytest.mark.parametrize("tp,ep,dispatcher", LAYOUTS, ids=[f"tp{t}ep{e}-{d}" for t, e, d in LAYOUTS])
def test_layout_matches_single_rank(reference, tp, ep, dispatcher):
    hf_dir, ref_logits, ref_grads = reference
    results = spawn(tp * ep, _run, tp, ep, dispatcher, hf_dir, False)
    grads = {}
    for start, logits, rank_grads in results:
        ref = ref_logits[start:start + logits.shape[0]]
        assert logits.shape == ref.shape
        rel = _rel(logits, ref)
        assert rel < 1e-5, f"tp{tp} ep{ep} {dispatcher}: logits relative error {rel:.2e}"
        for name, grad in rank_grads.items():  # ranks that hold the same tensor must agree
            if name in grads:
                assert _rel(grad, grads[name]) < 1e-6, name
            grads[name] = grad
    assert grads.keys() == ref_grads.keys(), grads.keys() ^ ref_grads.keys()
    errors = {name: _rel(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"tp{tp} ep{ep} {dispatcher}: {worst} grad rel. error {errors[worst]:.2e}"
