"""`r1mega-train data=code reward=code` end to end, small: a base model pre-trained briefly on the code
corpus writes programs, the trainer's reward workers run them in the sandbox as each row finishes
decoding, and the step reports how their tests ended."""

from __future__ import annotations

import pytest

from rl_helpers import run
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

CODE = [
    "data=code", "reward=code", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.head_dim=16",
    "data.train_size=64", "data.test_size=8", "data.prompts_per_step=4", "algorithm.group_size=4",
    "rollout.eval_samples=0", "pretrain.steps=150", "pretrain.documents=3000", "pretrain.optimizer.lr=5e-3",
    "reward.num_workers=1", "trainer.steps=2", "trainer.tensorboard=false", "trainer.plot=false",
    "trainer.progress=false",
]


def test_programs_written_by_the_policy_run_in_the_sandbox(tmp_path):
    history = spawn(1, run, [f"pretrain.cache_dir={tmp_path}/base"], str(tmp_path / "run"), 1, CODE)[0]
    steps = [h for h in history if "reward/code_pass" in h]
    assert len(steps) == 2
    for h in steps:
        tests = sum(h[f"reward/code_{k}"] for k in ("pass", "wrong", "timeout", "error", "skipped"))
        rows = 4 * 4
        assert tests == 3 * (rows - h["reward/code_no_code"])  # three hidden tests per program written
        assert h["reward/failures"] == 0 and h["reward/timeouts"] == 0
        # all-or-nothing: the accuracy of a row is 1 exactly when its three tests pass
        assert h["reward/accuracy"] * rows <= h["reward/code_pass"] / 3
    written = sum(4 * 4 - h["reward/code_no_code"] for h in steps)
    assert written >= 16, "the briefly pre-trained model should write programs"
    assert sum(h["reward/code_pass"] + h["reward/code_wrong"] for h in steps) > 0  # they ran and printed
    final = history[-1]  # the held-out evaluation after the last step scores programs the same way
    assert 0.0 <= final["eval/greedy_accuracy"] <= 1.0 and final["eval/prompts"] == 8
