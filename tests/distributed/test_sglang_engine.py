"""rollout=sglang end to end on gloo ranks, against stand-in servers (tests/distributed/sglang_standin.py).

The stand-ins hold a transformers model of the same config and load every synced bucket into
it, refusing tensors the HF model does not have, wrong shapes or dtypes, repeats, missing
parameters and calls out of order. Their log-probs of the sampled tokens then match the
trainer's: the weights crossed intact. The real server is exercised by the `sglang` test.
"""

from __future__ import annotations

import pytest
import torch

from rl_helpers import run
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

COMMON = ["rollout=sglang", "trainer.steps=2", "algorithm.minibatches=2", "correction=tis",
          "rollout.sglang.bucket_mb=0.05", "trainer.eval_at_ends=true"]


def _run(overrides, output_dir, world):
    import r1mega.rollout.sglang.launch as launch
    from sglang_standin import start_standins

    registry = {}
    launch.start_servers = start_standins(registry)
    history = run(overrides, output_dir, world)
    return history, {e: s.calls for e, s in registry.items()}


def _engine_calls(results):
    return {e: calls for _, per_rank in results for e, calls in per_rank.items()}


def _check_turns(calls, expect_generate: bool = True):
    """Each sync: resume weights, one session of updates, flush, resume the rest; release after use."""
    kinds = [c[0] for c in calls]
    syncs = [i for i, k in enumerate(kinds) if k == "begin"]
    assert len(syncs) >= 3  # eval at step 0, two steps (and the final eval)
    assert syncs[0] == 0  # a server starts with its memory resident
    for i in syncs:
        j = kinds.index("end", i)
        assert all(k == "update" for k in kinds[i + 1:j]) and j > i + 1
        assert kinds[j + 1] == "flush"
        if i > 0:
            assert calls[i - 1] == ("resume", ("weights",))
            assert calls[j + 2] == ("resume", ("cuda_graph", "kv_cache"))
        nxt = kinds.index("release", j)
        assert calls[nxt] == ("release", ("cuda_graph", "kv_cache", "weights"))
        if expect_generate:
            assert "generate" in kinds[j + 2:nxt]
    versions = [c[2] for c in calls if c[0] == "update"]
    assert versions == sorted(versions, key=int)


def _check_metrics(history, weights_backup: bool = False):
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        # the stand-in's transformers model samples; the trainer recomputes: same weights, same numbers
        assert m["logprob_gap_max"] < 1e-5, m["logprob_gap_max"]
        assert m["time/sync"] > 0 and m["time/release"] > 0
    # the first evaluation synced, then released the weights: without a CPU backup SGLang threw them
    # away, so step 1 syncs them again; with one, it finds them. Step 2 syncs the updated ones.
    assert ("sync/gb" in history[0]) != weights_backup
    m = history[1]
    assert m["sync/gb"] > 0 and m["sync/buckets"] >= 2 and m["sync/gb_per_s"] > 0


def test_colocated_tp2_trainer_two_engines(tmp_path):
    """Training TP=2, two one-GPU engines: the data-parallel leader splits its prompts over both;
    each rank sends its own IPC payloads; optimizer states and parameters leave and come back."""
    out = spawn(2, _run, [*COMMON, "parallel.tp=2", "rollout.sglang.tp=1", "rollout.sglang.offload_params=true"],
                str(tmp_path / "tp2"), 2)
    history = out[0][0]
    _check_metrics(history)
    calls = _engine_calls(out)
    assert sorted(calls) == [0, 1]
    for e in (0, 1):
        _check_turns(calls[e])


def test_colocated_pp2_trainer_one_tp2_engine_with_weights_backup(tmp_path):
    """Training PP=2, one engine over both GPUs: every stage's tensors reach every rank, and the
    engine's first rank sends both ranks' payloads (entry i for engine TP rank i). The server keeps
    a CPU copy of its weights through releases, so nothing is resent after an evaluation."""
    out = spawn(2, _run, [*COMMON, "parallel.pp=2", "rollout.sglang.tp=2",
                          "+rollout.sglang.server_args.enable_weights_cpu_backup=true"], str(tmp_path / "pp2"), 2)
    _check_metrics(out[0][0], weights_backup=True)
    calls = _engine_calls(out)
    assert sorted(calls) == [0]
    _check_turns(calls[0])


def _generate_with_seeds(deterministic: bool):
    """Samples from one deterministic-inference stand-in through the engine: two training calls of
    3 prompts x 4, then one seeded call twice (evaluation)."""
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.platform.distributed import running
    from r1mega.rollout.sglang.client import SGLangClient
    from r1mega.rollout.sglang.engine import SGLangEngine
    from r1mega.rollout.sglang.topology import Topology
    from r1mega.rollout.types import SamplingParams
    from sglang_standin import StandIn, serve

    model = ModelConfig(name="t", arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, vocab_size=96)
    with running(ParallelConfig(), seed=1):
        standin = StandIn(model, tp=1, seed=5, server_args={"enable_deterministic_inference": deterministic})
        client = SGLangClient(f"http://127.0.0.1:{serve(standin).server_address[1]}", timeout_s=60)
        engine = SGLangEngine(Topology("colocated", tp=1, world_size=1, ranks_per_node=1), [client], None, [],
                              1 << 20, memory_saver=True, seed=3)
        prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
        params = SamplingParams(temperature=1.0, max_new_tokens=8)
        train = [engine.generate(prompts, params, n=4).response_ids for _ in range(2)]
        seeded = [engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=7), n=4).response_ids
                  for _ in range(2)]
        return train, seeded, standin.seeds, engine.state_dict()


def test_every_sample_has_its_own_seed():
    """A server in deterministic-inference mode samples a request's tokens from (seed, position):
    the samples of a group, and of later steps, differ only because each request has its own seed;
    a seeded (evaluation) call gives the same samples again."""
    train, seeded, seeds, state = spawn(1, _generate_with_seeds, True)[0]
    first, second = train
    for g in range(3):
        assert len({tuple(r) for r in first[4 * g:4 * g + 4]}) > 1  # pass@k sees k different answers
    assert first != second  # the next step samples anew
    assert seeded[0] == seeded[1]
    assert len(set(seeds[:24])) == 24 and None not in seeds and state["calls"] == 2


def _disaggregated():
    """Rank 0 trains; rank 1 stands for a one-GPU engine that joins the weight-update group."""
    import torch.distributed as dist

    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.platform.distributed import running
    from r1mega.rollout.sglang.buckets import buckets
    from r1mega.rollout.sglang.client import SGLangClient
    from r1mega.rollout.sglang.topology import Topology
    from r1mega.rollout.sglang.transport import NcclTransport
    from sglang_standin import StandIn, serve, use_stub_metadata

    model = ModelConfig(name="t", arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, vocab_size=96, tie_word_embeddings=False)
    use_stub_metadata()
    with running(ParallelConfig(), seed=1):
        group = dist.new_group([0, 1], backend="gloo")
        standin, url = None, [None]
        if dist.get_rank() == 1:
            standin = StandIn(model, tp=1, seed=5)
            standin.group = group
            url[0] = f"http://127.0.0.1:{serve(standin).server_address[1]}"
        dist.broadcast_object_list(url, src=1)
        if dist.get_rank() == 1:
            dist.barrier()  # the sync runs in the server's thread meanwhile
            return standin.calls, {k: v.clone() for k, v in standin.model.state_dict().items()}
        client = SGLangClient(url[0], timeout_s=60)
        topo = Topology("disaggregated", tp=1, world_size=1, ranks_per_node=1, base_gpu_id=1, num_gpus=1)
        transport = NcclTransport(topo, [client], "127.0.0.1", 0, init_group=lambda *args: group)
        named = list(StandIn(model, tp=1, seed=9).model.state_dict().items())  # another random model's weights
        client.begin_weight_update()
        for bucket in buckets(named, 20_000):
            transport.send(bucket, "1")
        client.end_weight_update()
        transport.close = lambda: None  # the group is the test's
        dist.barrier()
        return named, None


def test_disaggregated_buckets_arrive_over_the_group():
    """The NCCL path's contract on gloo: one init per engine with rank_offset 1, then per bucket the
    names, dtypes and shapes SGLang allocates from (aligned, back to back) and one broadcast."""
    (named, _), (calls, received) = spawn(2, _disaggregated)
    assert calls[0] == ("init_group", 1, 2, "r1mega-weights")
    updates = [c for c in calls if c[0] == "update"]
    assert len(updates) > 2 and sum(c[1] for c in updates) == len(named) and calls[-1] == ("end",)
    for name, tensor in named:
        assert torch.equal(received[name], tensor), name
