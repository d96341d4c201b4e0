"""On-policy distillation with a real SGLang server as the teacher: its prompt log-probs of the student's
tokens (prefill only, `logprob_start_len` one before the response) equal those of the same weights as a
teacher in the job, so one step of each takes the same reverse KL; top-k as well.

Needs sglang and a CUDA GPU. The teacher is the tiny model with random weights, exported to an HF folder
with the built-in tokenizer; the server runs it in fp32 on this GPU beside the student.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["algorithm=opd", "model=tiny", "pretrain.enabled=false", "trainer.steps=1", "trainer.eval_at_ends=false",
          "trainer.save_at_end=false", "trainer.plot=false", "trainer.tensorboard=false", "trainer.progress=false",
          "data.prompts_per_step=8", "algorithm.group_size=2"]


def _teacher(folder: Path) -> Path:
    """Random tiny weights as an r1mega model folder and its HF export (the train CLI at 0 steps)."""
    subprocess.run([sys.executable, "-m", "r1mega.cli.train", "model=tiny", "pretrain.enabled=false",
                    "trainer.steps=0", "trainer.eval_at_ends=false", "trainer.export_hf=true", "trainer.plot=false",
                    "trainer.tensorboard=false", f"trainer.output_dir={folder}"], check=True, cwd=ROOT, timeout=600)
    return folder / "hf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reverse_kl(out: Path, teacher: list) -> float:
    subprocess.run([sys.executable, "-m", "r1mega.cli.train", *COMMON, *teacher, f"trainer.output_dir={out}"],
                   check=True, cwd=ROOT, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["opd/reverse_kl"] for r in rows if "opd/reverse_kl" in r)


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_served_teacher_scores_as_the_teacher_in_the_job(tmp_path, top_k):
    hf = _teacher(tmp_path / "teacher")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(hf), "--port",
                               str(port), "--dtype", "float32", "--mem-fraction-static", "0.2"],
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(2)
        top = [f"algorithm.opd.top_k={top_k}"]
        teacher = [f"algorithm.opd.teacher.path={tmp_path / 'teacher' / 'model'}", *top]
        in_job = _reverse_kl(tmp_path / "in-job", teacher)
        served = _reverse_kl(tmp_path / "served", [*teacher, f"algorithm.opd.teacher.server=http://127.0.0.1:{port}"])
        assert in_job > 0 and abs(served - in_job) <= 1e-3 * in_job, (served, in_job)
    finally:
        server.terminate()
        server.wait(timeout=60)
