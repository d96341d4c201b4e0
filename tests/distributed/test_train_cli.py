"""`r1mega-train` from the command line: a complete run folder (with its HF export), SIGTERM saves and
resume finishes, a run killed mid-run resumes with each step once in its metrics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from r1mega.trainer.metrics import read_rows
from rl_helpers import SMALL

pytestmark = pytest.mark.distributed

HELPERS = str(Path(__file__).parent)


def _train(args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "r1mega.cli.train", *SMALL, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _latest(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


@pytest.mark.parametrize("layout", [["parallel=tp2"], ["experiment=tiny_moe_ep2"]])
def test_train_writes_run_folder(tmp_path, layout):
    out = tmp_path / "run"
    extra = ["model.num_layers=2", "model.moe.num_experts=4"] if "experiment" in layout[0] else []
    proc = _train([*layout, *extra, "trainer.steps=2", f"trainer.output_dir={out}", "trainer.tensorboard=true",
                   "trainer.plot=true", "trainer.export_hf=true"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = [r for r in _rows(out) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.trainer.output_dir == str(out) and saved.trainer.steps == 2
    assert "parameters" in err  # parameter counts printed at start
    assert (out / "curves.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    # trainer.export_hf: a complete HF folder beside the r1mega one, which transformers loads as it is
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = out / "hf"
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in hf.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.architectures == ["Qwen3ForCausalLM" if "tp2" in layout[0] else "Qwen3MoeForCausalLM"]
    assert len(AutoTokenizer.from_pretrained(hf)) == len(AutoTokenizer.from_pretrained(out / "model")) > 1


def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["trainer.steps=40", f"trainer.output_dir={out}", "trainer.eval_at_ends=false"]
    proc = _train(args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and _rows(out):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stop signal received" in err
    stopped = _rows(out)[-1]["step"]
    assert 1 <= stopped < 40
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped}"
    resumed = _train([*args, "trainer.steps=" + str(stopped + 2), "trainer.load=auto"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert [r["step"] for r in _rows(out)] == list(range(1, stopped + 3))


# per-step values that do not depend on timing
VALUES = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "reward/mean", "clip_fraction", "response/length_mean")


def test_sigkill_mid_run_resumes_with_each_step_once(tmp_path):
    """Killed with SIGKILL after writing a step past its last checkpoint, a run resumed from that
    checkpoint drops the rows it writes again: metrics.jsonl and TensorBoard hold each step once, with
    the values of an uninterrupted run."""
    out = tmp_path / "killed"
    args = ["trainer.save_every=2", "trainer.eval_at_ends=false", "trainer.tensorboard=true"]
    proc = _train([*args, "trainer.steps=200", f"trainer.output_dir={out}"], start_new_session=True)
    killed = 0
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not killed:
            rows = read_rows(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
            if rows and rows[-1]["step"] > _latest(out) >= 2:  # a row after the last checkpoint
                os.killpg(proc.pid, signal.SIGSTOP)  # then check again: the run may have moved on
                rows = read_rows(out / "metrics.jsonl")
                if rows[-1]["step"] > _latest(out):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = rows[-1]["step"]
                else:
                    os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.01)
    finally:
        if not killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert killed, "the run ended before a step past its checkpoint was seen"
    saved = _latest(out)
    assert saved < killed and [r["step"] for r in read_rows(out / "metrics.jsonl")][-1] == killed
    steps = killed + 1
    resumed = _train([*args, f"trainer.steps={steps}", f"trainer.output_dir={out}", "trainer.load=auto"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"at step {saved}" in err
    whole = _train([*args, f"trainer.steps={steps}", f"trainer.output_dir={tmp_path / 'whole'}"])
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    got, want = _rows(out), _rows(tmp_path / "whole")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for a, b in zip(got, want):
        for key in VALUES:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"step {a['step']} {key}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, steps + 1))
