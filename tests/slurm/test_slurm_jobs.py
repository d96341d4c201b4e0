"""r1mega-submit and `-m` sweeps against a real Slurm cluster (slurm/local-cluster.sh start).

Two-rank CPU GRPO jobs of a small random model: a job that runs through, a job whose time
limit runs out (signalled, checkpointed, requeued, resumed), a sweep with one job per point,
and the checks r1mega-submit makes against the cluster before it submits.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slurm

SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.head_dim=16", "data.train_size=64", "data.test_size=6",
    "data.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=6", "rollout.eval_samples=2",
    "optimizer.warmup_steps=0", "pretrain.enabled=false", "reward.num_workers=0", "trainer.tensorboard=false",
    "trainer.plot=false", "trainer.progress=false", "trainer.micro_batch_tokens=96", "trainer.eval_at_ends=false",
    "trainer.eval_every=0",
]


SUBMITTED: list = []  # job ids of the test now running


@pytest.fixture(autouse=True)
def cancel_leftovers():
    """A failed test leaves no job of its own behind to hold the node for the next."""
    SUBMITTED.clear()
    yield
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True)


def _submit(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1mega.cli.submit", *SMALL, *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    SUBMITTED.append(job_id)
    return job_id


def _job(job_id: str) -> dict:
    """`scontrol show job` as a dict (finished jobs stay listed for the cluster's MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(job_id: str, until, timeout: float = 420.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id)
        if until(job):
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout} s")


def _daemon_log(job_id: str) -> str:
    """What the cluster's daemons logged about a job, to explain a failure."""
    logs = Path(os.environ.get("SLURM_CONF", "/nonexistent")).parent / "log"
    lines = [f"{p.name}: {line}" for p in sorted(logs.glob("*.log")) for line in p.read_text().splitlines()
             if f"JobId={job_id} " in line + " " or f"job {job_id}" in line.lower() or f"StepId={job_id}." in line]
    return "\n--- daemon logs ---\n" + "\n".join(lines[-40:])


def _done(job: dict) -> bool:
    return job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _steps(run: Path) -> list:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nodes,ranks_per_node", [(1, 2), (2, 1)])
def test_two_rank_job_runs_and_is_recorded(tmp_path, nodes, ranks_per_node):
    job_id = _job_id(_submit(tmp_path, "cluster.launcher=srun", f"cluster.nodes={nodes}",
                             f"cluster.ranks_per_node={ranks_per_node}", "trainer.steps=4", "trainer.output_dir=run"))
    job = _wait(job_id, _done)
    run = tmp_path / "run"
    log = (run / "slurm" / f"{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert (job["NumNodes"], job["NumTasks"]) == (str(nodes), "2") and _steps(run) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4" and (run / "model").is_dir()
    record = json.loads((run / "slurm" / "submissions.jsonl").read_text())
    assert record["job_id"] == job_id and record["partition"] == "debug" and "trainer.steps=4" in record["argv"]
    saved = OmegaConf.load(run / "slurm" / "config.yaml")
    assert saved.trainer.output_dir == str(run) and saved.trainer.load == "auto" and saved.trainer.steps == 4
    script = (run / "slurm" / "job.sbatch").read_text()
    assert f"srun --kill-on-bad-exit=1 --label --ntasks-per-node={ranks_per_node}" in script


def test_time_limit_signal_checkpoint_requeue_resume(tmp_path):
    """Two nodes, one torchrun each, and more steps than any machine runs within the 2-minute
    limit, so every run ends by Slurm's warning (75 s before the limit; its checks put that
    15-45 s into the run, after start-up) whatever the machine's speed: the ranks save, the job
    requeues itself and resumes from the checkpoint; the resumed run is warned too, saves again
    and, its one requeue (cluster.max_requeues=1) used, ends. Every step ran exactly once."""
    steps = 10**6  # a step can't take under 120 us (it generates, scores and trains): never reached in 2 minutes
    job_id = _job_id(_submit(tmp_path, "cluster.launcher=torchrun", "cluster.nodes=2", "cluster.ranks_per_node=1",
                             "cluster.time=2", "cluster.signal_lead_s=75", "cluster.max_requeues=1",
                             f"trainer.steps={steps}", "trainer.output_dir=run"))
    job = _wait(job_id, lambda j: _done(j) and j.get("Restarts") == "1", timeout=600)
    run = tmp_path / "run"
    log = (run / "slurm" / f"{job_id}.out").read_text()  # both runs append to it
    # not requeued, the script ends with torchrun's code: 0 after the warning's orderly stop (so srun
    # never SIGTERMs one node for another's exit); never TIMEOUT: the ranks saved and stopped in time
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2", log[-3000:] + _daemon_log(job_id)
    assert "Traceback" not in log, log[-3000:]
    stopped = re.findall(r"^\d+: r1mega: torchrun stopped its ranks on SIGUSR1", log, re.M)
    assert len(stopped) == 4, log[-3000:]  # 2 nodes x 2 runs
    saved = [int(s) for s in re.findall(r"stop signal received: checkpoint saved at step (\d+)", log)]
    assert len(saved) == 2 and 1 <= saved[0] < saved[1] < steps, saved
    assert f"requeueing job {job_id} (restart 1)" in log  # rank 0, after every rank saved
    assert f"r1mega: requeueing job {job_id}" in log  # the batch script, on the host
    assert f"r1mega: job {job_id} (restart 1)" in log
    assert f"resumed from {run}/checkpoints/step_{saved[0]} at step {saved[0]}" in log
    assert "job restarted 1 times (cluster.max_requeues): not requeueing" in log
    assert _steps(run) == list(range(1, saved[1] + 1))  # every step once: none lost, none repeated
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved[1]}"


def test_sweep_submits_one_job_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "r1mega.cli.train", "-m", "hydra/launcher=slurm", *SMALL,
                             "trainer.steps=2", "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        SUBMITTED.extend(p.name.split("_")[0] for p in (sweep / ".submitit").glob("*_*"))
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    for point, lr in (("0", 1e-3), ("1", 3e-3)):
        rows = [json.loads(line) for line in (sweep / point / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and rows[-1]["lr"] == pytest.approx(lr)
    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert scripts, "submitit wrote no sbatch script"
    script = scripts[0].read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --signal=USR2@60" in script and "#SBATCH --requeue" in script


@pytest.mark.parametrize("overrides,message", [
    (["cluster.partition=gpu"], "cluster.partition='gpu': no such partition; sinfo lists: debug (default), short"),
    (["cluster.gpus_per_node=2"], "cluster.gpus_per_node=2, but the nodes of partition 'debug' have at most 0 GPUs"),
    (["cluster.nodes=4", "cluster.ranks_per_node=1"], "cluster.nodes=4, but partition 'debug' has 2 node(s)"),
    (["cluster.partition=short", "cluster.time=1:00:00"], "over the time limit of partition 'short' (10 min)"),
    (["parallel.tp=3"], "parallel.tp=3"),
])
def test_refused_before_submission(tmp_path, overrides, message):
    proc = _submit(tmp_path, "trainer.output_dir=run", *overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
