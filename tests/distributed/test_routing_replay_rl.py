"""Routing replay in RL runs: the native engine records, for every token it feeds, the experts the
trainer's own full forward routes it to (the oracle: the log-prob pass's recording, at TP=1 and under
TP=2 with sequence parallelism); R3 runs train with no token routed otherwise than it was sampled, with
the routing carried from rollout workers, asynchronous SGLang engines and the one-step-off engine as
well; R2 replays the old policy's routing in the later minibatch; bad combinations are refused by key."""

from __future__ import annotations

import pytest
import torch

from rl_helpers import config, run
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

MOE = ["model=tiny_moe", "model.num_layers=2", "model.moe.num_experts=8", "model.moe.router_topk=2"]


def _engine_against_trainer(folder: str, extra):
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.rollout.setup import native_engine, sampling_params
    from r1mega.trainer.model_setup import build_policy, initial_weights, run_tokenizer
    from r1mega.trainer.rl.batch import StepBatch, micro_batches
    from r1mega.trainer.rl.routing import enable, record_old_routing
    from r1mega.trainer.rl.logprob_passes import forward_logprobs

    cfg = config(folder, [*MOE, "algorithm.routing_replay=rollout", *extra],
                 world_size=2 if "parallel.tp=2" in extra else 1)
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        tokenizer = run_tokenizer(cfg)
        chunks, ddp, _, _ = build_policy(cfg, initial_weights(cfg, runtime, tokenizer))
        engine = native_engine(cfg, chunks, tokenizer, seed=3)
        enable(cfg, chunks, engine)
        prompts = [tokenizer("12+34=")["input_ids"], tokenizer("7+5=")["input_ids"], tokenizer("1")["input_ids"]]
        rollouts = engine.generate(prompts, sampling_params(cfg), n=2)
        batch = StepBatch.from_rollouts(rollouts, torch.zeros(len(rollouts)))
        recorded_by_engine = batch.routing
        batch.routing = None  # the trainer routes on its own, and records
        micro = micro_batches(cfg, batch, list(range(len(batch))))
        recorded = {}
        forward_logprobs(ddp, micro, 1.0, recorded)
        record_old_routing(batch, micro, recorded, chunks[0].config)
        lengths = [len(p) + len(r) - 1 for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
        return recorded_by_engine, batch.routing, lengths
    finally:
        destroy()


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_engine_records_what_the_trainer_routes(tmp_path, layout):
    extra = ["parallel.tp=2", "parallel.sequence_parallel=true"] if layout == "tp2" else []
    per_rank = spawn(2 if extra else 1, _engine_against_trainer, str(tmp_path), extra)
    for engine, trainer, lengths in per_rank:
        assert len(engine) == len(trainer) == 6
        for row, (a, b, n) in enumerate(zip(engine, trainer, lengths)):
            assert a.shape == b.shape == (n, 2, 2), row  # every input position, both MoE layers, top-2
            assert torch.equal(a.sort(-1).values, b.sort(-1).values), f"row {row}: engine and trainer route apart"
        assert any(len(set(r[:, 0].flatten().tolist())) > 2 for r in engine)  # the routers do route


@pytest.mark.parametrize("pack", ["true", "false"])
def test_rollout_replay_trains_on_the_sampled_routing(tmp_path, pack):
    """R3: every token of the log-prob pass and the update takes the experts it was sampled with, in THD packs
    and in right-padded rows alike (a misplaced layout would route tokens otherwise)."""
    metrics = spawn(1, run, [*MOE, "algorithm.routing_replay=rollout", "trainer.steps=2", f"trainer.pack={pack}"],
                    str(tmp_path), 1)[0]
    for m in metrics:
        assert m["routing/replay_mismatch_share"] == 0.0 and abs(m["logprob_gap"]) < 1e-5


def test_old_policy_replay_in_later_minibatches(tmp_path):
    """R2: the second minibatch, after an optimizer step large enough to move the routers, replays the old
    policy's routing (its own would differ for many tokens); with weights that cannot move, none differ."""
    common = [*MOE, "algorithm.routing_replay=old", "algorithm.minibatches=2", "trainer.steps=1"]
    moved = spawn(1, run, [*common, "optimizer.lr=3e-2"], str(tmp_path / "moved"), 1)[0]
    still = spawn(1, run, [*common, "optimizer.lr=1e-30"], str(tmp_path / "still"), 1)[0]
    assert moved[0]["routing/replay_mismatch_share"] > 0.05
    assert still[0]["routing/replay_mismatch_share"] == 0.0


def test_old_policy_replay_under_context_parallelism(tmp_path):
    """R2 with each row cut over two context-parallel ranks: every rank records its chunks of the old
    policy's pass, and the later minibatch (packed anew) replays them; the steps equal one rank's."""
    from test_rl_run import COMPARED, _close, _save_init

    init = str(tmp_path / "init")
    moe = [*MOE, "model.moe.aux_loss_coeff=0.0"]
    spawn(1, _save_init, init, moe)
    common = [*moe, "algorithm.routing_replay=old", "algorithm.minibatches=2", "trainer.steps=2", "optimizer.lr=3e-2",
              f"model.mcore_path={init}"]
    one = spawn(1, run, common, str(tmp_path / "one"), 1)[0]
    cp2 = spawn(2, run, [*common, "parallel.cp=2"], str(tmp_path / "cp2"), 2)[0]
    for a, b in zip(cp2, one):
        for key in (*COMPARED, "routing/replay_mismatch_share"):
            assert _close(a[key], b[key], 1e-4, key), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert one[-1]["routing/replay_mismatch_share"] > 0.05  # the replay differs from the routers' own choice


@pytest.mark.parametrize("extra,named", [
    (["model=tiny", "algorithm.routing_replay=rollout"], "has no MoE layers"),
    ([*MOE, "algorithm.routing_replay=old"], "one minibatch"),
    ([*MOE, "algorithm.routing_replay=rollout", "rollout.mode=async", "algorithm.max_staleness=1",
      "rollout.asynchronous.partial=true", "rollout.asynchronous.partial_kv=recompute"], "use partial_kv=keep"),
    ([*MOE, "algorithm.routing_replay=rollout", "model.moe.load_balancing_type=sinkhorn"], "sinkhorn"),
])
def test_refusals_name_the_key(tmp_path, extra, named):
    from r1mega.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config(str(tmp_path), extra)
    assert "algorithm.routing_replay" in str(err.value) and named in str(err.value)


def _sglang_run(overrides, output_dir, world, forget_flag=False):
    import r1mega.rollout.sglang.launch as launch
    from sglang_standin import start_standins

    if forget_flag:  # servers started without --enable-return-routed-experts
        launch.server_args = lambda cfg: dict(cfg.rollout.sglang.server_args)
    registry = {}
    launch.start_servers = start_standins(registry)
    return run(overrides, output_dir, world), {e: s.calls for e, s in registry.items()}


SGLANG = ["rollout=sglang", "rollout.sglang.bucket_mb=0.01", "trainer.steps=2"]


@pytest.mark.parametrize("model", ["dsv3"])  # Qwen3-MoE's names: test_sglang_lanes_carry_their_routing
def test_sglang_routing_replay(tmp_path, model):
    """R3 on SGLang (stand-in servers: a transformers model with SGLang 0.5.23's routed-experts return): the
    rows carry the experts the server routed each position to, and the trainer's log-prob pass and update,
    replaying them, find its own routing the same. DeepSeek-V3 (MLA with a query latent, expert bias) also
    checks the weight names against SGLang's loader, in buckets small enough to split any layer: a fused
    q_a_proj / kv_a_proj_with_mqa half sent alone would be dropped, and the sync fail."""
    arch = MOE if model == "qwen3_moe" else ["model=tiny_dsv3", "model.num_query_groups=4"]
    history, calls = spawn(1, _sglang_run, [*arch, *SGLANG, "algorithm.routing_replay=rollout"],
                           str(tmp_path), 1)[0]
    for m in history:
        assert m["routing/replay_mismatch_share"] == 0.0, m["routing/replay_mismatch_share"]
        assert m["logprob_gap_max"] < 1e-4, m["logprob_gap_max"]
    updates = [c for c in calls[0] if c[0] == "update"]
    assert len(updates) > 10  # many small buckets per sync


def test_sglang_without_the_server_flag_is_named(tmp_path):
    """A server not started with --enable-return-routed-experts leaves the field out (no error): r1mega
    says so, naming the server."""
    with pytest.raises(Exception) as err:
        spawn(1, _sglang_run, [*MOE, *SGLANG, "algorithm.routing_replay=rollout"], str(tmp_path), 1, True)
    assert "--enable-return-routed-experts" in str(err.value) and "/generate" in str(err.value)


R3 = [*MOE, "algorithm.routing_replay=rollout", "trainer.steps=1"]


def _same_steps(got, sync, timing):
    assert [m["step"] for m in got] == [1]
    for a, b in zip(got, sync):
        # logprob_gap is float32 rounding (~1e-7); a worker's engine runs in a process of its own
        shared = [k for k in b if not k.startswith(timing) and k != "logprob_gap"]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
        assert abs(a["logprob_gap"] - b["logprob_gap"]) < 1e-6
        assert a["routing/replay_mismatch_share"] == 0.0


def test_rollout_workers_carry_their_routing(tmp_path):
    """Asynchronous rollout workers (native engines of their own, staleness 0) record the experts on their
    copy of the policy and send them with the rows: the run takes the synchronous run's steps."""
    from test_async_rl import ASYNC, TIMING, _run_at_async_threads

    sync = spawn(1, _run_at_async_threads, R3, str(tmp_path / "sync"))[0]
    got = spawn(1, _run_at_async_threads, [*R3, *ASYNC], str(tmp_path / "async"))[0]
    _same_steps(got, sync, TIMING)


def test_sglang_lanes_carry_their_routing(tmp_path):
    """rollout.mode=async on SGLang engines of their own (stand-ins): each request asks for the routed
    experts and its rows carry them; the run takes the synchronous SGLang run's steps."""
    from test_async_sglang import TIMING, _common, _run

    common = [*_common(), *R3]
    sync, _ = spawn(1, _run, common, str(tmp_path / "sync"), None, 1)[0]
    got, _ = spawn(1, _run, [*common, "rollout.mode=async"], str(tmp_path / "async"), None, 1)[0]
    assert not isinstance(sync, Exception) and not isinstance(got, Exception), (sync, got)
    _same_steps(got, sync, TIMING)


def test_one_step_off_carries_its_routing(tmp_path):
    """The one-step-off engine (colocated SGLang stand-ins, two ranks) generates the next step's rows during
    this step, their routing with them: with weights that cannot move, its steps are the synchronous ones."""
    from test_one_step_off import AHEAD, COMMON, TIMING, _run

    still = [*COMMON, *R3, "trainer.steps=2", "optimizer.lr=1e-30"]  # step 2's rows came during step 1
    sync = spawn(2, _run, still, str(tmp_path / "sync"), 2)[0][0]
    ahead = spawn(2, _run, [*still, *AHEAD], str(tmp_path / "ahead"), 2)[0][0]
    for a, b in zip(ahead, sync):
        shared = [k for k in b if not k.startswith(TIMING)]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
        assert a["routing/replay_mismatch_share"] == 0.0
