"""Two GRPO steps with rollout=sglang on a 0.5B model and a real SGLang server (colocated on this
GPU), after an evaluation: weights sync, memory turns (the evaluation's release throws the
engine's weights away, so step 1 syncs them again), and the engine's log-probs agree with the
trainer's.

Needs sglang and a CUDA GPU. The model is Qwen2.5-0.5B's architecture with random weights, or
the local checkpoint folder named by R1MEGA_SGLANG_MODEL (r1mega never downloads at run time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]

MODEL = os.environ.get("R1MEGA_SGLANG_MODEL")


def test_two_grpo_steps_on_sglang(tmp_path):
    out = tmp_path / "run"
    weights = [f"model.hf_path={MODEL}"] if MODEL else []
    cmd = [sys.executable, "-m", "r1mega.cli.train", "model=qwen2.5-0.5b", *weights, "rollout=sglang",
           "rollout.max_new_tokens=64", "rollout.sglang.mem_fraction_static=0.3",
           "data.prompts_per_step=8", "algorithm.group_size=4", "correction=tis", "pretrain.enabled=false",
           "trainer.steps=2", "trainer.eval_at_ends=true", "rollout.eval_samples=2", "data.test_size=8",
           "trainer.save_at_end=false", "trainer.plot=false",
           "trainer.tensorboard=false", f"trainer.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # bf16 engine vs bf16 trainer: different kernels, same weights; bf16 rounding moves log-probs by ~1e-2
        assert r["logprob_gap"] < 0.05, r["logprob_gap"]
        assert r["sync/gb"] > 0.9 and r["sync/gb_per_s"] > 0  # 0.5B bf16 parameters crossed
        assert r["memory/generate_device_gib"] > r["memory/update_trainer_gib"] > 0
    assert Path(out / "sglang" / "engine-0.log").is_file()
