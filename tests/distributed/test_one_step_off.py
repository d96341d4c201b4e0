"""rollout.mode=async with colocated SGLang engines (one step off-policy), on two gloo ranks against
stand-in servers (tests/distributed/sglang_standin.py), which refuse a generation while their memory
is released and die on a release while requests run, as SGLang 0.5.23 does.

- With weights that never change (a learning rate too small to move an fp32 weight) the run takes the
  synchronous run's steps exactly: the same prompts, seeds, rewards and losses, only one step early.
- Each engine's calls show the schedule: the next step's groups generate after the sync and before
  the release, under the weights of the step before; the trainer's log-probs of them then differ
  from the engine's, while step 1's (on-policy) agree.
- A run resumed from a checkpoint trains on the groups it holds and takes the uninterrupted run's step.
"""

from __future__ import annotations

import pytest
import torch

from rl_helpers import run
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

COMMON = ["rollout=sglang", "rollout.sglang.tp=1", "trainer.steps=3", "correction=decoupled",
          "+rollout.sglang.server_args.enable_deterministic_inference=true"]
AHEAD = ["rollout.mode=async", "algorithm.max_staleness=1"]
TIMING = ("time/", "perf/", "sync/")


def _run(overrides, output_dir, world):
    import r1mega.rollout.sglang.launch as launch
    from sglang_standin import start_standins

    registry = {}
    launch.start_servers = start_standins(registry)
    return run(overrides, output_dir, world), {e: list(s.calls) for e, s in registry.items()}


def _calls(out):
    return {e: calls for _, per_rank in out for e, calls in per_rank.items()}


def test_unchanging_weights_take_the_synchronous_steps(tmp_path):
    still = [*COMMON, "optimizer.lr=1e-30", "trainer.eval_at_ends=true"]
    sync = spawn(2, _run, still, str(tmp_path / "sync"), 2)[0][0]
    ahead = spawn(2, _run, [*still, *AHEAD], str(tmp_path / "ahead"), 2)[0][0]
    assert [m["step"] for m in ahead] == [1, 2, 3]
    for a, b in zip(ahead, sync):
        shared = [k for k in b if not k.startswith(TIMING)]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
    assert [m["async/staleness_max"] for m in ahead] == [0.0, 1.0, 1.0]


def _schedule(calls):
    """Per engine: what each generation ran under (the count of weight syncs before it), and the
    calls between each sync and the release that follows it."""
    syncs, under, turns = 0, [], []
    for c in calls:
        if c[0] == "begin":
            syncs += 1
            turns.append([])
        elif c[0] == "generate":
            under.append(syncs)
        if turns and c[0] in ("generate", "release"):
            turns[-1].append(c[0])
    return under, turns


def test_schedule_and_exact_resume(tmp_path):
    args = [*COMMON, *AHEAD, "trainer.eval_at_ends=false", "rollout.sglang.offload_params=true"]
    whole, calls = spawn(2, _run, [*args, "trainer.save_every=2"], str(tmp_path / "whole"), 2)[0]
    assert [m["async/staleness_max"] for m in whole] == [0.0, 1.0, 1.0]
    assert whole[0]["logprob_gap_max"] < 1e-5  # sampled by the weights it trains: the same numbers
    assert all(m["logprob_gap_max"] > 1e-4 for m in whole[1:])  # sampled by the weights of the step before
    for engine_calls in _calls([(None, calls)]).values():
        under, turns = _schedule(engine_calls)
        # steps 1 and 2's groups under sync 1 (weights 0), step 3's under sync 2 (weights 1); the last
        # step sends nothing ahead
        assert under == [1, 1, 2]
        assert turns == [["generate", "generate", "release"], ["generate", "release"], ["release"]]

    middle = tmp_path / "whole" / "checkpoints" / "step_2"
    state = torch.load(middle / "common.pt", weights_only=False)["data"]
    ahead = state["one_step_off"]
    assert ahead["version"] == 1 and len(ahead["groups"]) == 2  # step 3's groups, both data-parallel ranks'
    # the streams stand before them, where a synchronous run's step 3 starts: prompts and seed calls of two steps
    assert state["sampler"]["position"] == 2 * 4 and state["engine"]["calls"] == 2
    with pytest.raises(Exception, match="algorithm.group_size changed"):
        spawn(2, _run, [*args, f"trainer.load={middle}", "algorithm.group_size=2"], str(tmp_path / "other"), 2)
    rest = spawn(2, _run, [*args, f"trainer.load={middle}"], str(tmp_path / "rest"), 2)[0][0]
    assert [m["step"] for m in rest] == [3]
    shared = [k for k in whole[2] if not k.startswith(TIMING)]
    assert {k: rest[0][k] for k in shared} == {k: whole[2][k] for k in shared}
