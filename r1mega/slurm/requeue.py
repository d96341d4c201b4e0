"""After a time-limit warning: the stopped job goes back in the queue and resumes from its checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Optional

from r1mega.config.schema import ClusterConfig
from r1mega.platform.atomic import write_text_atomic
from r1mega.platform.signals import StopRequest

log = logging.getLogger(__name__)

# Set by r1mega's sbatch script: rank 0 leaves this file and the script runs `scontrol requeue`
# on the host once the job step has ended (a container image often has no Slurm commands).
REQUEUE_FILE_ENV = "R1MEGA_REQUEUE_FILE"


def leave_requeue_file(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, right after the stop checkpoint: ask r1mega's batch script to requeue the job.

    Done before the loop's last barrier: once ranks exit, srun may end the step at any moment.
    True when the file was written (requeue_if_warned then has nothing left to do)."""
    job = _job_id(cluster) if _wants_requeue(cluster, stop) else None
    return job is not None and _write_requeue_file(job, stop)


def requeue_if_warned(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, once every rank has saved and stopped: have this Slurm job requeued. True if so.

    Only a time-limit warning requeues (SIGTERM alone means scancel, or a preemption Slurm
    requeues itself), and only a run that stopped before its last step. Where another Python
    handler owned the warning signal before r1mega (submitit, under Hydra's launcher), that
    handler requeues; else `scontrol requeue`, unless the requeue file already asked for it.
    """
    if stop.requeued:
        return True
    if not _wants_requeue(cluster, stop):
        return False
    handler = stop.previous_handler(stop.warning)
    if handler is not None:
        name = getattr(handler, "__qualname__", handler)
        log.info("time-limit warning: handing over to the job's own handler %s", name)
        handler(stop.warning, None)  # submitit requeues and exits here
        return True
    job = _job_id(cluster)
    if job is None:
        if os.environ.get("SLURM_JOB_ID"):
            log.warning("job restarted %d times (cluster.max_requeues): not requeueing", _restarts())
        return False
    if _write_requeue_file(job, stop):
        return True
    log.warning("time-limit warning: checkpoint saved, requeueing job %s (restart %d)", job, _restarts() + 1)
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    stop.requeued = True
    return True


def _wants_requeue(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """A time-limit warning stopped an unfinished run, and requeueing is on."""
    return stop.warning is not None and stop.stopped_early and cluster.requeue


def _job_id(cluster: ClusterConfig) -> Optional[str]:
    """This Slurm job's id while it may still be requeued (under cluster.max_requeues), else None."""
    job = os.environ.get("SLURM_JOB_ID")
    return job if job is not None and _restarts() < cluster.max_requeues else None


def _write_requeue_file(job: str, stop: StopRequest) -> bool:
    """The file r1mega's batch script looks for (REQUEUE_FILE_ENV); False when there is none to write."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if not marker:
        return False
    try:
        write_text_atomic(marker, f"{job}\n")
    except OSError as e:  # e.g. the folder is not mounted in the container: scontrol may still do
        log.error("cannot write the requeue file %s: %s", marker, e)
        return False
    log.warning("time-limit warning: checkpoint saved, requeueing job %s (restart %d)", job, _restarts() + 1)
    stop.requeued = True
    return True


def _restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
