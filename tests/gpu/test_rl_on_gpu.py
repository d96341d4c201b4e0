"""RL on a GPU, synchronous and asynchronous, end to end.

One trainer rank on the GPU and one rollout worker beside it: with a single GPU the worker shares the
device and weights travel over gloo through host memory (NCCL refuses two ranks on one device).
- The synchronous loop runs its steps on the GPU.
- With max_staleness 0 the async run samples the same tokens as the synchronous one, step by step.
- With staleness 1 and partial rollouts whose KV cache is computed again, no sample lags more than
  one version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from r1mega.platform.launch import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from rl_helpers import run  # noqa: E402

pytestmark = pytest.mark.gpu

ASYNC = ["rollout.mode=async", "trainer.eval_at_ends=false"]
# the same tokens give the same counts and rewards; the losses are GPU float sums, equal to rounding
EXACT = ("reward/", "response/", "async/staleness")


def test_async_takes_the_synchronous_steps_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sync = spawn(1, run, ["trainer.steps=3", "trainer.eval_at_ends=false"], str(tmp_path / "sync"), 1,
                 timeout=600.0)[0]
    got = spawn(1, run, ["trainer.steps=3", *ASYNC], str(tmp_path / "async"), 1, timeout=600.0)[0]
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(got, sync):
        assert a["async/staleness_max"] == 0
        for k in b:
            if k.startswith(EXACT) and isinstance(b[k], float):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a["loss"], b["loss"])


def test_async_partial_rollouts_hold_the_bound_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    extra = [*ASYNC, "trainer.steps=6", "algorithm.max_staleness=1", "rollout.max_new_tokens=24",
             "rollout.asynchronous.partial=true", "rollout.asynchronous.partial_kv=recompute",
             "algorithm.stale_samples=regenerate", "correction=decoupled"]
    out = spawn(1, run, extra, str(tmp_path / "run"), 1, timeout=600.0)[0]
    assert [m["step"] for m in out] == list(range(1, 7))
    for m in out:
        assert m["async/staleness_max"] <= 1 and m["async/token_staleness_mean"] <= 1, m
