"""rollout.mode=async on SGLang engines of their own (disaggregated), against stand-in servers on gloo
(tests/distributed/sglang_standin.py: SGLang 0.5.23's pause, weight-update lock and weight versions).

- With max_staleness 0 an async run takes the synchronous SGLang run's steps (every metric, 3 steps).
- Partial rollouts: a push pauses the engine (retract), updates and continues; the rows that were
  running report the version of every token, and the bound holds.
- A dead engine stops the run naming it, with a checkpoint of the last finished step.
"""

from __future__ import annotations

import pytest

from rl_helpers import run
from r1mega.platform.env import free_port
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

TIMING = ("time/", "perf/", "sync/", "async/trainer_wait_s", "async/rollout_busy_share")


def _common():
    return ["rollout=sglang", "rollout.sglang.mode=disaggregated", "rollout.sglang.num_gpus=1",
            "rollout.sglang.base_gpu_id=1", f"rollout.sglang.nccl_port={free_port()}",
            "+rollout.sglang.server_args.enable_deterministic_inference=true", "trainer.eval_at_ends=false"]


def _run(overrides, output_dir, knobs=None, world=1):
    import r1mega.rollout.sglang.launch as launch
    import r1mega.rollout.sglang.transport as transport
    from sglang_standin import start_standins, trainer_group

    registry = {}
    launch.start_servers = start_standins(registry, **(knobs or {}))
    transport._sglang_init_group = trainer_group
    transport.NcclTransport.close = lambda self: None  # a plain gloo group, which torch has not registered
    try:
        return run(overrides, output_dir, world), {e: s.calls for e, s in registry.items()}
    except Exception as e:  # the calls the engines saw, and the error with its traceback
        import traceback

        return RuntimeError(f"{e}\n{traceback.format_exc()}"), {i: s.calls for i, s in registry.items()}


@pytest.mark.parametrize("ranks", [1, 2])
def test_staleness_zero_takes_the_synchronous_steps(tmp_path, ranks):
    """One trainer rank, and two data-parallel ones (each its share of a step's groups, sampled with the
    seeds its synchronous call uses)."""
    common = [*_common(), "trainer.steps=3", f"rollout.sglang.base_gpu_id={ranks}"]
    sync, _ = spawn(ranks, _run, common, str(tmp_path / "sync"), None, ranks)[0]
    got, calls = spawn(ranks, _run, [*common, "rollout.mode=async"], str(tmp_path / "async"), None, ranks)[0]
    assert not isinstance(sync, Exception) and not isinstance(got, Exception), (sync, got)
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(got, sync):
        shared = [k for k in b if not k.startswith(TIMING)]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
        assert a["async/staleness_max"] == 0
    kinds = [c[0] for c in calls[0]]
    assert kinds[0] == "init_group" and "pause" not in kinds
    # each push in one session, with the policy version as weight_version, before the requests it gates
    versions = [c[2] for c in calls[0] if c[0] == "update"]
    assert sorted(set(versions), key=int) == ["0", "1", "2"]


def test_partial_rollouts_report_each_tokens_version(tmp_path):
    """Requests 0 and 1 start under version 0. The stand-in (first come, first served) holds request 1's
    first row before its second token until version 1 lands, and request 0, which step 1 trains on,
    decodes nothing until that row got there: the push pauses the engine (retract), the rows go on under
    the new weights, and SGLang's weight_versions spans give each token its version."""
    from r1mega.rollout.sglang.engine import sample_seeds

    # requests 0 and 1: four prompts x 4 samples each (trainer.seed=7)
    first, second = (set(sample_seeds((0, 7, i), 0, 16)) for i in (0, 1))
    extra = [*_common(), "rollout.mode=async", "trainer.steps=4", "trainer.seed=7", "algorithm.max_staleness=1",
             "rollout.asynchronous.partial=true", "rollout.asynchronous.partial_kv=recompute",
             "rollout.max_new_tokens=8", "correction=decoupled"]
    out, calls = spawn(1, _run, extra, str(tmp_path / "run"), {"hold": (second, 1), "gate": first})[0]
    assert not isinstance(out, Exception), out
    assert [m["step"] for m in out] == [1, 2, 3, 4]
    for m in out:
        assert m["async/staleness_max"] <= 1 and m["async/token_staleness_mean"] <= 1, m
    assert out[0]["async/version_span_max"] == 0.0
    # step 2 trains on request 1: its first row sampled one token under version 0 and the rest under
    # version 1; the rows after it started under version 1
    m = out[1]
    assert m["async/version_span_max"] == 1.0 and m["async/staleness_1_share"] == 1 / 16
    assert abs(m["async/token_staleness_mean"] - 1 / (16 * m["response/length_mean"])) < 1e-12
    kinds = [c[0] for c in calls[0]]
    for i, kind in enumerate(kinds):
        if kind == "begin" and i > 1:  # every push after the first: paused (retract) around its session
            assert calls[0][i - 1] == ("pause", "retract")
            j = kinds.index("end", i)
            assert kinds[j + 1:j + 3] == ["flush", "continue"]


def test_dead_engine_stops_the_run_with_a_checkpoint(tmp_path):
    out, _ = spawn(1, _run, [*_common(), "rollout.mode=async", "trainer.steps=3", "trainer.save_every=1",
                             "rollout.asynchronous.prompts_per_request=2"], str(tmp_path / "run"), {"die_at": 3})[0]
    assert isinstance(out, Exception)
    assert "SGLang engine 0 (http://127.0.0.1:" in str(out) and "killed by the test" in str(out), out
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "common.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()
