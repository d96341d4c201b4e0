"""A bridge joins processes of different torch.distributed worlds (the trainer's and rollout
workers'): named tensors of several dtypes broadcast from rank 0 arrive whole and bit-equal, call
after call, while each process keeps its own default world; a TP=2 trainer's weights, gathered to
HF names and sent over it, load into a one-rank worker's model of another seed through the same
converter as HF checkpoints, which then computes the trainer's logits."""

from __future__ import annotations

import io
import multiprocessing as mp

import pytest
import torch

from r1mega.platform.env import free_port

pytestmark = pytest.mark.distributed


def _ports(n: int) -> list:
    """n distinct free ports (each free_port call checks one port alone)."""
    ports = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _bytes(obj) -> bytes:
    """Tensors through a multiprocessing queue as bytes: torch would share their memory with the
    receiver through the sender, which may have exited by then."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data))


def _tensors(call: int):
    g = torch.Generator().manual_seed(call)
    return {"embedding.weight": torch.randn(7, 5, generator=g), "norm.weight": torch.randn(5, generator=g),
            "half.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16), "step": torch.tensor(call),
            "ids": torch.arange(6).reshape(2, 3) * call, "mask": torch.rand(4, generator=g) > 0.5}


def _member(rank: int, size: int, port: int, own_port: int, results):
    import torch.distributed as dist

    from r1mega.platform.bridge import Bridge

    # each process is a world of its own, as a rollout worker is
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{own_port}", rank=0, world_size=1)
    bridge = Bridge("127.0.0.1", port, rank, size, timeout_s=120)
    got = [bridge.broadcast_named(_tensors(call) if rank == 0 else None) for call in (1, 2)]
    bridge.barrier()
    results.put((rank, dist.get_world_size(), _bytes(got)))
    bridge.close()
    dist.destroy_process_group()


def test_named_tensors_cross_worlds():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    size = 3
    port, *own = _ports(size + 1)
    procs = [ctx.Process(target=_member, args=(r, size, port, own[r], results)) for r in range(size)]
    for p in procs:
        p.start()
    out = dict((rank, (world, _load(got))) for rank, world, got in (results.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (world, got) in out.items():
        assert world == 1  # its own world all along
        for call, tensors in zip((1, 2), got):
            want = _tensors(call)
            assert list(tensors) == list(want), rank
            for name, t in want.items():
                assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), (rank, call, name)


def test_the_source_must_pass_its_tensors():
    from r1mega.platform.bridge import Bridge

    bridge = Bridge("127.0.0.1", free_port(), 0, 1, timeout_s=30)
    with pytest.raises(ValueError, match="must pass its tensors"):
        bridge.broadcast_named(None)
    assert bridge.broadcast_named({"x": torch.ones(2)})["x"].tolist() == [1.0, 1.0]
    bridge.close()


MODEL = dict(name="t", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, head_dim=16, vocab_size=96, qk_layernorm=True, init_method_std=0.1)
IDS = torch.tensor([[5, 17, 40, 9, 22, 61, 7, 3]])


def _trainer(port: int):
    import torch.distributed as dist

    from layout_utils import logits
    from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.bridge import Bridge
    from r1mega.platform.distributed import running

    model = ModelConfig(**MODEL)
    with running(ParallelConfig(tp=2), 3):
        chunks = build_model(model, ParallelConfig(tp=2))
        tensors = {k: v.cpu() for k, v in world_hf_tensors(chunks, model, make_plan(chunks, model))}
        if dist.get_rank() == 0:  # the trainer's rank 0 alone joins the bridge
            bridge = Bridge("127.0.0.1", port, 0, 2, timeout_s=120)
            bridge.broadcast_named(tensors)
            bridge.close()
        return logits(chunks, IDS)


def _worker(port: int, own_port: int, results):
    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(own_port))
    from layout_utils import logits
    from r1mega.checkpoint.hf_convert import load_hf_weights
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.bridge import Bridge
    from r1mega.platform.distributed import running

    model = ModelConfig(**MODEL)
    with running(ParallelConfig(), 99):  # another seed: other weights until the trainer's arrive
        chunks = build_model(model, ParallelConfig())
        before = logits(chunks, IDS)
        bridge = Bridge("127.0.0.1", port, 1, 2, timeout_s=120)
        load_hf_weights(chunks, model, bridge.broadcast_named(None))
        bridge.close()
        results.put(_bytes((before, logits(chunks, IDS))))


def test_trainer_weights_reach_a_worker_of_another_world():
    from r1mega.platform.launch import spawn

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, own = _ports(2)
    worker = ctx.Process(target=_worker, args=(port, own, results))
    worker.start()
    try:
        trainer = spawn(2, _trainer, port)[0]
        before, after = _load(results.get(timeout=300))
    finally:
        worker.join(timeout=60)
    assert worker.exitcode == 0
    assert not torch.allclose(before, trainer, atol=1e-3)  # the seeds gave other weights
    assert torch.allclose(after, trainer, atol=1e-5, rtol=0)
