"""After a time-limit warning: the stopped job goes back in the queue and resumes from its checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from r1mega.config.schema import ClusterConfig
from r1mega.platform.signals import StopRequest

log = logging.getLogger(__name__)

# Set by r1mega's sbatch script: rank 0 leaves this file and the script runs `scontrol requeue`
# on the host once the job step has ended (a container image often has no Slurm commands).
REQUEUE_FILE_ENV = "R1MEGA_REQUEUE_FILE"


def requeue_if_warned(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, once every rank has saved and stopped: have this Slurm job requeued. True if so.

    Only a time-limit warning requeues (SIGTERM alone means scancel, or a preemption Slurm
    requeues itself), and only a run that stopped before its last step. Where another Python
    handler owned the warning signal before r1mega (submitit, under Hydra's launcher), that
    handler requeues.
    """
    if stop.warning is None or not stop.stopped_early:
        return False
    handler = stop.previous_handler(stop.warning)
    if handler is not None:
        name = getattr(handler, "__qualname__", handler)
        log.info("time-limit warning: handing over to the job's own handler %s", name)
        handler(stop.warning, None)  # submitit requeues and exits here
        return True
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or not cluster.requeue:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= cluster.max_requeues:
        log.warning("job %s restarted %d times (cluster.max_requeues): not requeueing", job, restarts)
        return False
    log.warning("time-limit warning: checkpoint saved, requeueing job %s (restart %d)", job, restarts + 1)
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if marker:
        tmp = Path(f"{marker}.{os.getpid()}.tmp")
        tmp.write_text(f"{job}\n")
        os.replace(tmp, marker)
        return True
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    return True
