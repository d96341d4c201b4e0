"""`r1mega-train` from the command line: a complete run folder, SIGTERM saves and resume finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rl_helpers import SMALL

pytestmark = pytest.mark.distributed

HELPERS = str(Path(__file__).parent)


def _train(args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "r1mega.cli.train", *SMALL, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [["parallel=tp2"], ["experiment=tiny_moe_ep2"]])
def test_train_writes_run_folder(tmp_path, layout):
    out = tmp_path / "run"
    extra = ["model.num_layers=2", "model.moe.num_experts=4"] if "experiment" in layout[0] else []
    proc = _train([*layout, *extra, "trainer.steps=2", f"trainer.output_dir={out}", "trainer.tensorboard=true",
                   "trainer.plot=true"])
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
