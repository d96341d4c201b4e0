"""GRPO on the tiny DeepSeek-V3 model (multi-latent attention, DeepSeekMoE with its expert bias): two
steps with the experts split over two ranks (TP=2 x EP=2, so the same data-parallel rank holds every
prompt) take the single rank's steps, from one set of weights."""

from __future__ import annotations

import pytest

from rl_helpers import run
from test_rl_run import ALGO, COMPARED, _close, _save_init
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

# without the load-balancing loss: with it, sigmoid routing with an expert bias under TP=2 x EP=2 drifts
# from one rank at step 2 (pg_loss off by 2e-4 relative at coefficient 0.001, by 3e-3 at 0.05; without
# the bias, or with softmax routing, it agrees within 3e-5), which is not resolved yet
MODEL = ["model=tiny_dsv3", "model.num_query_groups=4", "model.moe.aux_loss_coeff=0.0"]


def test_expert_parallel_steps_match_single_rank(tmp_path):
    init = str(tmp_path / "init")
    spawn(1, _save_init, init, MODEL)
    common = [*MODEL, *ALGO, f"model.mcore_path={init}", "trainer.steps=2"]
    ref = spawn(1, run, common, str(tmp_path / "ref"), 1)[0]
    split = spawn(2, run, [*common, "parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                           "parallel.sequence_parallel=true"], str(tmp_path / "tp2ep2"), 2)[0]
    assert [m["step"] for m in split] == [1, 2]
    for a, b in zip(split, ref):
        for key in COMPARED:
            assert _close(a[key], b[key], 1e-4, key), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert any(m["grad_norm"] > 0 for m in ref) and any(m["advantage/abs_mean"] > 0 for m in ref)
