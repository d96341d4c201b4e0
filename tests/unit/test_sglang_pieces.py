"""The SGLang engine's pure parts: topology, buckets and their packed layout, request and response
formats, the launch command, the version check, the client's errors, the config rules."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from r1mega.config.errors import ConfigError
from r1mega.rollout.sglang.buckets import buckets, pack, serialize, unpack
from r1mega.rollout.sglang.client import SGLangClient, SGLangError
from r1mega.rollout.sglang.engine import parse_outputs, sample_seeds, sampling_payload
from r1mega.rollout.sglang.server import check_version, server_command
from r1mega.rollout.sglang.topology import Topology, engines_for, split_even
from r1mega.rollout.types import SamplingParams

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "distributed"))
import sglang_standin  # noqa: E402
from sglang_standin import INT_KEYS, SAMPLING_KEYS, StandIn, loads, serve  # noqa: E402


@pytest.fixture
def stub_metadata(monkeypatch):
    """sglang's metadata class is not installed here: pack with the stand-in's."""
    import r1mega.rollout.sglang.buckets as b

    monkeypatch.setattr(b, "_meta_class", lambda: sglang_standin.FlattenedTensorMetadata)


def test_colocated_topology_blocks_of_tp():
    t = Topology("colocated", tp=2, world_size=8, ranks_per_node=4)
    assert t.num_engines == 4
    assert [t.owner(e) for e in range(4)] == [0, 2, 4, 6]
    assert [t.engine_gpu(e) for e in range(4)] == [0, 2, 0, 2]  # local GPU ids on each node
    assert t.owned_engines(4) == [2] and t.owned_engines(5) == []
    with pytest.raises(ValueError, match="rollout.sglang.tp=4 must divide .* ranks per node 2"):
        Topology("colocated", tp=4, world_size=8, ranks_per_node=2)


def test_disaggregated_topology_on_its_own_gpus():
    t = Topology("disaggregated", tp=2, world_size=4, ranks_per_node=4, base_gpu_id=4, num_gpus=4)
    assert t.num_engines == 2 and [t.owner(e) for e in range(2)] == [0, 0]
    assert [t.engine_gpu(e) for e in range(2)] == [4, 6]
    with pytest.raises(ValueError, match="base_gpu_id=2 puts engines on the trainer's GPUs 0-3"):
        Topology("disaggregated", tp=2, world_size=4, ranks_per_node=4, base_gpu_id=2, num_gpus=4)
    with pytest.raises(ValueError, match="num_gpus=3 must be a positive multiple"):
        Topology("disaggregated", tp=2, world_size=4, ranks_per_node=4, base_gpu_id=4, num_gpus=3)
    with pytest.raises(ValueError, match="rollout.sglang.mode='x'"):
        Topology("x", tp=1, world_size=1, ranks_per_node=1)


@pytest.mark.parametrize("leaders,engines", [(1, 4), (2, 4), (3, 8), (4, 2), (3, 3), (5, 2)])
def test_every_engine_serves_and_every_leader_has_one(leaders, engines):
    shares = [engines_for(i, leaders, engines) for i in range(leaders)]
    assert all(shares)
    assert {e for s in shares for e in s} == set(range(engines))
    if engines >= leaders:  # a contiguous share each, none shared
        assert sorted(e for s in shares for e in s) == list(range(engines))
    parts = split_even(10, 3)
    assert [len(p) for p in parts] == [3, 3, 4] and [i for p in parts for i in p] == list(range(10))


def _named(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c", torch.randn(4, 4, generator=g)), ("d", torch.randn(33, generator=g).to(torch.bfloat16)),
            ("e", torch.randint(0, 9, (5,), generator=g))]


def test_buckets_keep_order_and_budget():
    named = _named(0)
    sizes = [t.numel() * t.element_size() for _, t in named]  # 60, 14, 64, 66, 40
    got = list(buckets(named, 80))
    assert [n for b in got for n, _ in b] == [n for n, _ in named]
    for b in got:
        assert len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= 80
    assert [len(b) for b in got] == [2, 1, 1, 1]
    assert [len(b) for b in buckets(named, 1)] == [1] * 5  # oversized tensors travel alone
    assert sum(sizes) == sum(t.numel() * t.element_size() for b in buckets(named, 10**9) for _, t in b)


def test_buckets_never_split_a_layers_fused_latent_projections():
    """SGLang fuses q_a_proj with kv_a_proj_with_mqa only when one load call brings both: whatever the budget,
    a layer's pair shares a bucket; every other tensor keeps its order."""
    t = torch.zeros(10)  # 40 bytes each
    layer = lambda i, n: (f"model.layers.{i}.self_attn.{n}.weight", t)  # noqa: E731
    named = [layer(0, "q_a_proj"), layer(0, "q_b_proj"), layer(0, "kv_a_proj_with_mqa"),
             layer(1, "kv_a_proj_with_mqa"), layer(1, "o_proj"), layer(1, "q_a_proj"), layer(2, "q_proj")]
    for budget in (1, 40, 80, 120, 10**6):
        got = list(buckets(named, budget))
        assert sorted(n for b in got for n, _ in b) == sorted(n for n, _ in named)
        for i in (0, 1):
            where = {n: k for k, b in enumerate(got) for n, _ in b if n.startswith(f"model.layers.{i}.")
                     and ("q_a_proj" in n or "kv_a_proj" in n)}
            assert len(set(where.values())) == 1, (budget, where)
        others = [n for b in got for n, _ in b if "a_proj" not in n]
        assert others == [n for n, _ in named if "a_proj" not in n]


def test_pack_is_sglangs_flattened_layout(stub_metadata):
    named = _named(1)
    flat, meta = pack(named)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    offset = 0
    for m in meta:  # back to back, each start aligned to its element size (widest dtypes first)
        assert m.start_idx == offset and m.start_idx % m.dtype.itemsize == 0
        assert m.numel == m.end_idx - m.start_idx == m.shape.numel() * m.dtype.itemsize
        offset = m.end_idx
    assert offset == flat.numel()
    back = dict(unpack(flat, meta))
    assert back.keys() == dict(named).keys()
    for name, t in named:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_serialize_passes_a_restricted_unpickler(stub_metadata):
    flat, meta = pack(_named(2))
    obj = loads(serialize({"flattened_tensor": flat, "metadata": meta}))
    assert torch.equal(obj["flattened_tensor"], flat)
    assert [m.name for m in obj["metadata"]] == [m.name for m in meta]
    with pytest.raises(pickle.UnpicklingError, match="Blocked unsafe global r1mega.rollout.types.SamplingParams"):
        loads(serialize({"metadata": [SamplingParams()]}))


def test_pack_needs_sglangs_metadata_class():
    if __import__("importlib").util.find_spec("sglang") is None:
        with pytest.raises(RuntimeError, match="packing weights for SGLang needs sglang installed"):
            pack(_named(3))


def test_sampling_payload_passes_sglangs_schema():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, stop_token_ids=(5,), seed=3)
    out = sampling_payload(p, 4, stop_token_ids=[2, 5])
    assert set(out) <= SAMPLING_KEYS
    assert all(isinstance(out[k], int) for k in INT_KEYS & set(out))
    assert out["stop_token_ids"] == [2, 5] and out["n"] == 4 and out["top_k"] == 20
    assert "sampling_seed" not in out  # one per request, from sample_seeds


def test_sample_seeds_are_distinct_across_requests_ranks_calls_and_evaluation():
    keys = [(0, 1234, 0), (0, 1234, 1), (0, 1235, 0), (1, 0), (1, 1)]  # training calls, other run seed, evaluation
    seeds = [s for key in keys for rank in range(4) for s in sample_seeds(key, rank, 64)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 and isinstance(s, int) for s in seeds)
    assert sample_seeds((1, 7), 2, 8) == sample_seeds((1, 7), 2, 8)  # reproducible


def _output(ids, reason):
    return {"output_ids": ids, "meta_info": {"finish_reason": reason,
                                             "output_token_logprobs": [[-0.5 * i, t, None] for i, t in enumerate(ids)]}}


def test_parse_outputs():
    ids, lps, reasons = parse_outputs([_output([4, 2], {"type": "stop", "matched": 2}),
                                       _output([7, 7, 7], {"type": "length", "length": 3})], "u")
    assert ids == [[4, 2], [7, 7, 7]] and lps == [[0.0, -0.5], [0.0, -0.5, -1.0]] and reasons == ["stop", "length"]
    with pytest.raises(SGLangError, match="finish_reason=.*abort"):
        parse_outputs([_output([1], {"type": "abort", "message": "x"})], "u")
    bad = _output([1, 2], {"type": "length", "length": 2})
    bad["meta_info"]["output_token_logprobs"].pop()
    with pytest.raises(SGLangError, match="2 output ids but 1 log-probs"):
        parse_outputs([bad], "u")


def test_server_command():
    from r1mega.config.sglang_schema import SGLangConfig

    extra = {"disable_cuda_graph": True, "chunked_prefill_size": 4096, "enable_x": False, "stream_interval": 0}
    g = SGLangConfig(tp=2, mem_fraction_static=0.4, server_args=extra)
    cmd = server_command("/m", g, base_gpu_id=2, host="127.0.0.1", port=30001, dtype="bf16", seed=5, memory_saver=True)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args["--model-path"] == "/m" and args["--tp-size"] == "2" and args["--base-gpu-id"] == "2"
    assert args["--dtype"] == "bfloat16" and args["--load-format"] == "dummy"
    assert args["--chunked-prefill-size"] == "4096" and args["--stream-interval"] == "0"
    assert {"--skip-tokenizer-init", "--enable-memory-saver", "--disable-cuda-graph"} <= set(cmd)
    assert "--enable-x" not in cmd
    assert "--enable-memory-saver" not in server_command("/m", g, 0, "0.0.0.0", 1, "fp32", 0, memory_saver=False)


def test_version_check():
    assert check_version("0.5.23") == "0.5.23" and check_version("0.5.21.post1") == "0.5.21.post1"
    with pytest.raises(RuntimeError, match="sglang 0.5.20 is installed; .* supports 0.5.21, 0.5.22, 0.5.23"):
        check_version("0.5.20")
    if __import__("importlib").util.find_spec("sglang") is None:
        with pytest.raises(RuntimeError, match="rollout.engine=sglang needs sglang 0.5.23"):
            check_version()


def test_client_raises_on_refusals():
    from r1mega.config.schema import ModelConfig

    model = ModelConfig(name="t", arch="qwen2", num_layers=1, hidden_size=32, ffn_hidden_size=64,
                        num_attention_heads=2, num_query_groups=1, vocab_size=64)
    server = serve(StandIn(model, tp=1, seed=0))
    client = SGLangClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10)
    try:
        client.wait_ready(5)
        assert client.server_version() == "0.5.23"
        with pytest.raises(SGLangError, match="update_weights_from_tensor: HTTP 400: .*between begin_weight_update"):
            client.update_weights_from_tensor(["AA=="], "flattened_bucket", "1")
        client.begin_weight_update()
        with pytest.raises(SGLangError, match="begin_weight_update: HTTP 400: .*already open"):
            client.begin_weight_update()
        with pytest.raises(SGLangError, match="end_weight_update: HTTP 400: .*never arrived"):
            client.end_weight_update()
        client.release_memory()
        with pytest.raises(SGLangError, match="/generate: HTTP 400"):
            client.generate([[1, 2]], {"max_new_tokens": 2, "n": 1, "temperature": 1.0})
    finally:
        server.shutdown()
    with pytest.raises(SGLangError, match="not ready after 1 s"):
        SGLangClient("http://127.0.0.1:9", timeout_s=1).wait_ready(1)


def _cfg(*overrides, world=None):
    from r1mega.config.loader import load_config

    return load_config(["rollout=sglang", "trainer.output_dir=/tmp/unused", *overrides], world_size=world)


@pytest.mark.parametrize("override,message", [
    ("rollout.sglang.mem_fraction_static=1.5", "rollout.sglang.mem_fraction_static=1.5 is not in"),
    ("rollout.sglang.bucket_mb=0", "rollout.sglang.bucket_mb=0"),
    ("rollout.sglang.tp=0", "rollout.sglang.tp=0 must be >= 1"),
    ("rollout.sglang.mode=disaggregated", "needs rollout.sglang.num_gpus"),
    ("rollout.sglang.offload_params=true", "offload_params needs optimizer.distributed=true"),
])
def test_config_rules_name_the_key(override, message):
    extra = ["optimizer.distributed=false"] if "offload_params" in override else []
    with pytest.raises(ConfigError, match=message):
        _cfg(override, *extra)


def test_colocated_tp_must_divide_world():
    with pytest.raises(ConfigError, match="rollout.sglang.tp=4 must divide the world size 2"):
        _cfg("rollout.sglang.tp=4", "data.prompts_per_step=2", world=2)
    assert _cfg("rollout.sglang.tp=2", world=2).rollout.sglang.tp == 2
