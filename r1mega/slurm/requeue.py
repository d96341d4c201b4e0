"""After a time-limit warning: the stopped job goes back in the queue and resumes from its checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

from r1mega.config.schema import ClusterConfig
from r1mega.platform.signals import StopRequest

log = logging.getLogger(__name__)

# Set by r1mega's sbatch script: rank 0 leaves this file and the script runs `scontrol requeue`
# on the host once the job step has ended (a container image often has no Slurm commands).
REQUEUE_FILE_ENV = "R1MEGA_REQUEUE_FILE"


def leave_requeue_file(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, right after the stop checkpoint: ask r1mega's batch script to requeue the job.

    Done before the loop's last barrier: once ranks exit, srun may end the step at any moment.
    True when the file was written (requeue_if_warned then has nothing left to do)."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    job = _job_to_requeue(cluster, stop)
    if not marker or job is None or stop.requeued:
        return False
    try:
        tmp = Path(f"{marker}.{os.getpid()}.tmp")
        tmp.write_text(f"{job}\n")
        os.replace(tmp, marker)
    except OSError as e:  # e.g. the folder is not mounted in the container: scontrol may still do
        log.error("cannot write the requeue file %s: %s", marker, e)
        return False
    log.warning("time-limit warning: checkpoint saved, requeueing job %s (restart %d)", job, _restarts() + 1)
    stop.requeued = True
    return True


def requeue_if_warned(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, once every rank has saved and stopped: have this Slurm job requeued. True if so.

    Only a time-limit warning requeues (SIGTERM alone means scancel, or a preemption Slurm
    requeues itself), and only a run that stopped before its last step. Where another Python
    handler owned the warning signal before r1mega (submitit, under Hydra's launcher), that
    handler requeues; else `scontrol requeue`, unless the requeue file already asked for it.
    """
    if stop.requeued:
        return True
    if stop.warning is None or not stop.stopped_early or not cluster.requeue:
        return False
    handler = stop.previous_handler(stop.warning)
    if handler is not None:
        name = getattr(handler, "__qualname__", handler)
        log.info("time-limit warning: handing over to the job's own handler %s", name)
        handler(stop.warning, None)  # submitit requeues and exits here
        return True
    if leave_requeue_file(cluster, stop):
        return True
    job = _job_to_requeue(cluster, stop)
    if job is None:
        return False
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


def _job_to_requeue(cluster: ClusterConfig, stop: StopRequest) -> Optional[str]:
    """This Slurm job's id when a warned, unfinished run may be requeued, else None."""
    job = os.environ.get("SLURM_JOB_ID")
    if stop.warning is None or not stop.stopped_early or not cluster.requeue or job is None:
        return None
    if _restarts() >= cluster.max_requeues:
        log.warning("job %s restarted %d times (cluster.max_requeues): not requeueing", job, _restarts())
        return None
    return job


def _restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
