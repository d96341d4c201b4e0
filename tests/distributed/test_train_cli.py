"""The main job runs end to end from the command line and leaves a complete run folder."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("layout", [["parallel=tp2"], ["experiment=tiny_moe_ep2"]])
def test_train_writes_run_folder(tmp_path, layout):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega.cli.train", *layout, "trainer.steps=3", f"trainer.output_dir={out}"],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # finite, not NaN
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.trainer.output_dir == str(out) and saved.trainer.steps == 3
    assert "parameters" in proc.stderr  # parameter counts printed at start
