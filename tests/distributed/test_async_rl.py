"""Asynchronous RL end to end on CPU: one trainer rank, rollout workers in worlds of their own.

- With max_staleness 0, an async run takes the synchronous run's steps (every metric, 3 steps).
- 20-step runs, a slow trainer with a fast rollout and the reverse (two workers finishing out of
  order, partial rollouts), never train a sample older than the bound.
- A resumed run takes the uninterrupted run's requests, none lost or repeated.
- A worker killed mid-run ends the run with a message naming it and a checkpoint.
- The engine's per-token policy versions across a weight update between decode steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl_helpers import SMALL, run
from test_rl_run import ALGO, COMPARED, _close
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ASYNC = ["rollout.mode=async"]
TIMING = ("time/", "perf/", "async/trainer_wait_s", "async/rollout_busy_share")


def _run_at_async_threads(overrides, output_dir: str):
    """rl_helpers.run with the intra-op threads an async trainer rank takes beside one worker (half the
    cores): the thread count changes float rounding, so both runs use the same on any machine."""
    import os

    from rl_helpers import config
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.rl.train import train

    cfg = config(output_dir, overrides)
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        return train(cfg, runtime)
    finally:
        destroy()


def test_staleness_zero_takes_the_synchronous_steps(tmp_path):
    sync = spawn(1, _run_at_async_threads, ["trainer.steps=3"], str(tmp_path / "sync"))[0]
    got = spawn(1, _run_at_async_threads, ["trainer.steps=3", *ASYNC], str(tmp_path / "async"))[0]
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(got, sync):
        # logprob_gap, |engine log-prob - trainer log-prob| (~1e-7), is float32 rounding, and the worker's
        # engine runs in another process with its own thread count; everything else is equal
        shared = [k for k in b if not k.startswith(TIMING) and k != "logprob_gap"]
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}, a["step"]
        assert abs(a["logprob_gap"] - b["logprob_gap"]) < 1e-6
        assert a["async/staleness_max"] == 0 and a["async/staleness_0_share"] == 1.0


@pytest.mark.parametrize("side", ["slow_trainer", "slow_rollout"])
def test_staleness_bound_holds_on_every_sample(tmp_path, side):
    if side == "slow_trainer":  # four optimizer steps per RL step over short responses
        extra = ["algorithm.ppo_epochs=2", "algorithm.minibatches=2", "rollout.max_new_tokens=4",
                 "algorithm.max_staleness=1"]
    else:  # long responses; two workers of one prompt each finish out of order; partial rollouts
        extra = ["rollout.max_new_tokens=32", "algorithm.max_staleness=2", "rollout.asynchronous.workers=2",
                 "rollout.asynchronous.prompts_per_request=1", "rollout.asynchronous.partial=true",
                 "rollout.asynchronous.partial_kv=recompute", "algorithm.stale_samples=regenerate",
                 "rollout.asynchronous.weight_sync_every=2",
                 "trainer.eval_at_ends=false"]
    out = spawn(1, run, ["trainer.steps=12", *ASYNC, *extra], str(tmp_path / side), 1)[0]
    bound = 1 if side == "slow_trainer" else 2
    assert [m["step"] for m in out] == list(range(1, 13))
    for m in out:  # the step's largest lag over every sample (by its first token) and every token
        assert m["async/staleness_max"] <= bound and m["async/token_staleness_mean"] <= bound, m
        assert abs(sum(m[f"async/staleness_{k}_share"] for k in range(bound + 1)) - 1.0) < 1e-9
    assert out[0]["async/staleness_max"] == 0  # the first step's samples start from the first weights


def test_resumed_run_takes_the_same_requests(tmp_path):
    common = ["trainer.steps=4", *ASYNC, "algorithm.max_staleness=1", "trainer.eval_at_ends=false"]
    whole = spawn(1, run, [*common, "trainer.save_every=2"], str(tmp_path / "whole"), 1)[0]
    middle = tmp_path / "whole" / "checkpoints" / "step_2"
    state = torch.load(middle / "common.pt", weights_only=False)
    # request 2 was queued ahead and not trained on, unless step 2 took its result before the push
    # thread had announced step 1's weights (the gate then held request 2 back): either way the
    # checkpoint holds what is out, and the resumed run goes on with request 2
    assert [p[0] for p in state["data"]["async"]["pending"]] in ([2], [])
    # a synchronous resume goes on with the seed stream where the requests left it
    assert state["data"]["engine"]["calls"] == state["data"]["async"]["next_id"] >= 2
    rest = spawn(1, run, [*common, f"trainer.load={middle}"], str(tmp_path / "rest"), 1)[0]
    assert [m["step"] for m in rest] == [3, 4]
    # one worker finishes in order: the same requests (prompts and seeds) at the same steps
    assert [m["async/first_request"] for m in whole] == [0.0, 1.0, 2.0, 3.0]
    assert [m["async/first_request"] for m in rest] == [2.0, 3.0]
    assert rest[0]["async/staleness_max"] == 0  # generated afresh under the restored weights
    # a synchronous run would skip the queued prompts (the stream is past them): refused, naming the checkpoint
    state["data"]["async"]["pending"] = [(2, [5, 6, 7, 8], 2002)]
    torch.save(state, middle / "common.pt")
    with pytest.raises(Exception, match=r"checkpoint .*step_2: written by rollout.mode=async with 1 request"):
        spawn(1, run, ["trainer.steps=4", f"trainer.load={middle}"], str(tmp_path / "sync"), 1)


def test_killed_worker_stops_the_run_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [*SMALL, *ASYNC, "trainer.steps=4", f"trainer.output_dir={out}", "trainer.eval_at_ends=false",
            # 16 samples a request: the second request's scoring kills its worker
            "+reward.custom.kill._target_=rl_helpers.KillAfter", "+reward.custom.kill.weight=0.0",
            "+reward.custom.kill.after=20",
            "rollout.asynchronous.worker_timeout_s=60"]
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.train", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rollout worker 0 (pid" in proc.stderr and "exited with code -9" in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint of the last finished step: {out / 'checkpoints' / 'step_1'}" in proc.stderr
    assert (out / "checkpoints" / "step_1" / "common.pt").is_file()
    assert not (out / "checkpoints" / "step_2").exists()


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_run_goes_on_without_a_lost_worker(tmp_path, how):
    """Two workers of one prompt per request; one is killed (SIGKILL) or hangs (silent, then killed
    after worker_timeout_s) while scoring. With on_worker_failure=continue its requests go to the
    other worker and the run finishes every step on the requests it would have taken."""
    lost = ["+reward.custom.lose._target_=rl_helpers.KillAfter", "+reward.custom.lose.weight=0.0",
            "+reward.custom.lose.after=6", f"+reward.custom.lose.marker={tmp_path / 'lost'}",
            f"+reward.custom.lose.hang={how == 'hung'}", "reward.timeout_s=3600"]
    extra = [*ASYNC, "trainer.steps=4", "trainer.eval_at_ends=false", "rollout.asynchronous.workers=2",
             "rollout.asynchronous.prompts_per_request=1", "rollout.asynchronous.on_worker_failure=continue",
             "rollout.asynchronous.worker_timeout_s=8", *lost]
    out = spawn(1, run, extra, str(tmp_path / "run"), 1)[0]
    assert [m["step"] for m in out] == [1, 2, 3, 4]
    assert (tmp_path / "lost").is_file()  # one worker did go
    assert out[-1]["async/workers_alive"] == 1.0 and out[-1]["async/workers_lost"] == 1.0
    assert out[0]["async/workers_alive"] == 2.0 or out[0]["async/workers_lost"] == 1.0
    # staleness 0: each step took exactly its own four requests, the lost one's sent again
    assert [m["async/first_request"] for m in out] == [0.0, 4.0, 8.0, 12.0]
    assert all(m["async/staleness_max"] == 0 for m in out)


def _versions_across_update():
    from r1mega.config.schema import ParallelConfig
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.rollout.native import NativeEngine
    from r1mega.rollout.types import SamplingParams
    from layout_utils import logits
    from test_native_engine import EOS, PAD, PROMPTS, model_config

    initialize(ParallelConfig(), seed=3)
    try:
        chunks = build_model(model_config(), ParallelConfig())
        old = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        new = {n: p + 0.05 * torch.randn_like(p) for n, p in old.items()}

        def load(weights):
            with torch.no_grad():
                for n, p in chunks[0].named_parameters():
                    p.copy_(weights[n])

        engine = NativeEngine(chunks, eos_token_ids=[EOS], pad_token_id=PAD, max_batch_size=12)
        params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
        out = {"before": engine.generate(PROMPTS, params, n=2)}
        for mode in ("keep", "recompute"):
            load(old)
            engine.version, calls = 0, []

            def update():  # between decode steps: after the third token, new weights (version 1)
                calls.append(1)
                if len(calls) != 3:
                    return False
                load(new)
                engine.version = 1
                return True

            engine.between_tokens, engine.recompute_after_update = update, mode == "recompute"
            got = engine.generate(PROMPTS, params, n=2)
            # the oracle: each whole sequence through the new weights at once
            full = [torch.log_softmax(logits(chunks, torch.tensor([p + r]))[0].double(), -1)
                    for p, r in zip(got.prompt_ids, got.response_ids)]
            out[mode] = (got, [[f[len(p) - 1 + i, t].item() for i, t in enumerate(r)]
                               for f, p, r in zip(full, got.prompt_ids, got.response_ids)])
        return out
    finally:
        destroy()


def test_partial_rollout_versions_per_token():
    out = spawn(1, _versions_across_update)[0]
    before = out["before"]
    assert before.versions == [[0] * len(r) for r in before.response_ids]
    for mode in ("keep", "recompute"):
        after, oracle = out[mode]
        gaps = []
        for ids, lp, versions, ids0, lp0, ref in zip(after.response_ids, after.logprobs, after.versions,
                                                     before.response_ids, before.logprobs, oracle):
            assert versions == [0] * min(3, len(ids)) + [1] * max(0, len(ids) - 3)
            assert ids[:3] == ids0[:3] and lp[:3] == lp0[:3]  # sampled under the old weights, as before
            gaps += [abs(a - b) for a, b in zip(lp[3:], ref[3:])]
        assert gaps  # some rows went on past the update
        changed = [lp[3:] != lp0[3:] for lp, lp0, ids in zip(after.logprobs, before.logprobs, after.response_ids)
                   if len(ids) > 3]
        assert changed and all(changed)  # the tokens after the update come from the new weights
        if mode == "recompute":  # the cache computed again: the new weights' log-probs of the whole sequence
            assert max(gaps) < 1e-5, max(gaps)
        else:  # the cache of the first tokens is the old weights': the later tokens' log-probs differ
            assert max(gaps) > 1e-3, max(gaps)


# minibatches draw their rows from each data-parallel rank's share: with one optimizer step per RL step
# the DP=2 update is the single rank's
TWO_RANKS = [a for a in ALGO if not a.startswith("algorithm.minibatches")] + [
    "trainer.steps=2", *ASYNC, "trainer.eval_at_ends=false"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return spawn(1, run, TWO_RANKS, str(tmp_path_factory.mktemp("async_one") / "one"), 1)[0]


@pytest.mark.parametrize("layout", ["parallel.tp=2", "data_parallel"])
def test_two_trainer_ranks_take_the_single_rank_steps(tmp_path, one_rank, layout):
    """The same requests (one worker, staleness 0) trained by two ranks, TP=2 (the weights gathered
    over both for each push) or DP=2 (each rank its share of the step's groups), equal one rank."""
    extra = [layout] if layout.startswith("parallel") else []
    two = spawn(2, run, [*TWO_RANKS, *extra], str(tmp_path / "two"), 2)[0]
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(two, one_rank):
        for key in COMPARED:
            assert _close(a[key], b[key], 1e-4, key), f"{layout} step {a['step']} {key}: {a[key]} vs {b[key]}"
