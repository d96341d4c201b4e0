"""The trainer's side of colocated memory turns: grads freed, optimizer states and parameters sent
to the host and back, and training continues exactly as if nothing had left.

Two optimizer steps from the same weights: one run offloads and reloads everything between the
steps, the other does not; the second step reads Adam's moments and the fp32 main parameters,
so anything lost or detached on the way shows in the weights.
"""

from __future__ import annotations

import pytest
import torch

from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

VOCAB, SEQ = 128, 16


def _two_steps(dtype: str, distributed: bool, offload: bool):
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import running
    from r1mega.trainer.pretrain import train_step
    from r1mega.trainer.rl.offload import TrainState
    from r1mega.trainer.optimizer import build_optimizer

    model = ModelConfig(name="t", arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB, dtype=dtype)
    opt = OptimizerConfig(lr=1e-2, warmup_steps=0, distributed=distributed)
    batches = torch.randint(0, VOCAB, (2, 4, SEQ + 1), generator=torch.Generator().manual_seed(3))
    with running(ParallelConfig(), seed=7):
        chunks = build_model(model, ParallelConfig())
        ddp, optimizer, scheduler = build_optimizer(chunks, model, opt, total_steps=4)
        state = TrainState(ddp, optimizer, offload_optimizer=True, offload_params=True)
        train_step(ddp, optimizer, scheduler, list(batches[0].split(2)), SEQ, 2)
        freed = {}
        if offload:
            shared_before = _sharing_model_storage(optimizer, chunks)
            originals = _device_copies(optimizer, chunks, dtype)
            state.offload_training()
            for t in originals:  # whatever training reads next must come back from the host copies
                t.fill_(float("nan"))
            state.offload_parameters()
            freed = {"offloaded": list(state.offloaded),
                     "grad_storage": sum(b.grad_data.untyped_storage().size() for c in ddp for b in c.buffers),
                     "param_storage": sum(p.untyped_storage().size() for p in chunks[0].parameters())}
            state.reload()
            freed["shared"] = (shared_before, _sharing_model_storage(optimizer, chunks))
            device = next(chunks[0].parameters()).device
            freed["homes"] = {t.device == device for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                              for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t)
                              and t.dim() > 0}
        train_step(ddp, optimizer, scheduler, list(batches[1].split(2)), SEQ, 2)
        return {n: p.detach().float().clone() for n, p in chunks[0].named_parameters()}, freed


def _sharing_model_storage(optimizer, chunks) -> int:
    """How many optimizer parameters are the model's parameters or views of its buffers."""
    model = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    return sum(p.untyped_storage().data_ptr() in model for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               for g in opt.optimizer.param_groups for p in g["params"])


def _device_copies(optimizer, chunks, dtype: str):
    """The tensors the offload moves: Adam's moments, and the fp32 main parameters of a bf16 model."""
    model = {id(p) for c in chunks for p in c.parameters()}
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            out += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        if dtype != "fp32":
            out += [p.data for g in opt.optimizer.param_groups for p in g["params"] if id(p) not in model]
    assert out
    return out


@pytest.mark.parametrize("dtype,distributed", [("fp32", True), ("fp32", False), ("bf16", True)])
def test_offload_and_reload_leave_training_unchanged(dtype, distributed):
    ref, _ = spawn(1, _two_steps, dtype, distributed, False)[0]
    got, freed = spawn(1, _two_steps, dtype, distributed, True)[0]
    assert freed["offloaded"] == ["grads", "optimizer", "params"]
    assert freed["grad_storage"] == 0
    assert freed["homes"] == {True}  # every state back on the parameters' device (a GPU where there is one)
    before, after = freed["shared"]
    assert after == before and (before > 0) == (dtype == "fp32")  # fp32: still stepping the model itself
    assert freed["param_storage"] == 0  # a buffer's views (distributed optimizer) or each parameter's own
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
