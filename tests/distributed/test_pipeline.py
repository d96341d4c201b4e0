"""`r1mega-pipeline`: stages chained through their folders; killed in the middle of a stage and
started again, it skips finished stages and resumes the stopped one from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl_helpers import SMALL

pytestmark = pytest.mark.distributed

MODEL = [o for o in SMALL if o.startswith(("model.", "pretrain.", "reward.num_workers", "trainer."))]
EVAL = ["data.test_size=6", "rollout.max_new_tokens=6", "rollout.eval_samples=2"]
STEPS = 14


def stages() -> str:
    quote = lambda xs: ", ".join(f"'{x}'" for x in xs)  # noqa: E731
    sft = ["sft.train_files=[{data}/cold_start.jsonl]", "sft.template=r1_zero", f"sft.steps={STEPS}",
           "sft.samples_per_step=8", "sft.micro_batch_tokens=512", "trainer.save_every=1"]
    return ("pipeline.stages=["
            "{name: data, kind: cold_start_data, overrides: ['cold_start.traces=48', 'cold_start.general=8']}, "
            f"{{name: sft, kind: sft, evaluate: true, overrides: [{quote(sft)}]}}]")


def command(out: Path) -> list:
    return [sys.executable, "-m", "r1mega.cli.pipeline", f"pipeline.output_dir={out}", stages(),
            f"pipeline.common=[{', '.join(repr(o) for o in MODEL + EVAL)}]"]


ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}


def start_until_checkpoint(out: Path, step: int) -> subprocess.Popen:
    """The pipeline in its own session, once its SFT stage has saved checkpoint `step` (or ended)."""
    proc = subprocess.Popen(command(out), cwd=out.parent, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "sft" / "checkpoints" / f"step_{step}").is_dir() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    return proc


def test_killed_stage_resumes_and_finished_stages_are_kept(tmp_path):
    out = tmp_path / "pipe"
    first = start_until_checkpoint(out, 3)
    ckpt = out / "sft" / "checkpoints"
    os.killpg(first.pid, signal.SIGKILL)  # the runner and the stage process, mid-stage
    first.wait()
    assert (ckpt / "step_3").is_dir(), "the SFT stage never checkpointed"
    assert not (out / "sft" / "stage.json").exists() and not (out / "sft" / "model").exists()
    data_record = (out / "data" / "stage.json").read_text()
    data_mtime = (out / "data" / "cold_start.jsonl").stat().st_mtime_ns

    second = subprocess.run(command(out), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage data (cold_start_data): done, skipped" in second.stderr
    assert (out / "data" / "stage.json").read_text() == data_record
    assert (out / "data" / "cold_start.jsonl").stat().st_mtime_ns == data_mtime
    log = (out / "sft" / "stage.log").read_text()
    assert "resumed from" in log
    steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, STEPS + 1)) and steps[-1] == STEPS
    assert (out / "sft" / "model" / "model.yaml").is_file()
    rows = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["data", "sft"]
    assert rows[1]["greedy_accuracy"] is not None and rows[1]["seconds"] > 0
    assert "| sft | sft |" in second.stdout


def test_bad_stage_config_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "pipe"
    bad = [a.replace("sft.samples_per_step=8", "sft.samples_per_step=0") for a in command(out)]
    result = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pipeline stage 'sft': sft.samples_per_step must be >= 1" in result.stderr
    assert not (out / "data").exists()
    missing = [a.replace("{data}/cold", "{nowhere}/cold") for a in command(out)]
    result = subprocess.run(missing, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "{nowhere} names no stage (stages: data, sft)" in result.stderr


def test_a_dead_runner_makes_its_stage_checkpoint_and_stop(tmp_path):
    out = tmp_path / "pipe"
    runner = start_until_checkpoint(out, 2)
    ckpt = out / "sft" / "checkpoints"
    deadline = time.time() + 300
    runner.kill()  # the runner alone: its stage process gets SIGTERM (parent-death signal)
    runner.wait()
    log = out / "sft" / "stage.log"
    while "stop signal received" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "stop signal received: checkpoint saved" in log.read_text()
    assert not (out / "sft" / "stage.json").exists()
    saved = int((ckpt / "latest").read_text().strip().removeprefix("step_"))
    assert 2 <= saved < STEPS
    with contextlib.suppress(ProcessLookupError):  # the stage may still be exiting
        os.killpg(runner.pid, signal.SIGKILL)
