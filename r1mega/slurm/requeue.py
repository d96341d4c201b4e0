"""After a time-limit warning: the stopped job goes back in the queue and resumes from its checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess

from r1mega.config.schema import ClusterConfig
from r1mega.platform.signals import StopRequest

log = logging.getLogger(__name__)


def requeue_if_warned(cluster: ClusterConfig, stop: StopRequest) -> bool:
    """On rank 0, once every rank has saved and stopped: requeue this Slurm job. True when requeued.

    Only a warning stop requeues (SIGTERM means scancel or a preemption Slurm requeues itself),
    and only a run that stopped before its last step. Where another Python handler owned the
    warning signal before r1mega (submitit, under Hydra's launcher), that handler requeues.
    """
    if not (stop.warned and stop.stopped_early):
        return False
    handler = stop.previous_handler(stop.received)
    if handler is not None:
        log.info("time-limit warning: handing over to the job's own handler %s", getattr(handler, "__qualname__", handler))
        handler(stop.received, None)  # submitit requeues and exits here
        return True
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or not cluster.requeue:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= cluster.max_requeues:
        log.warning("job %s restarted %d times (cluster.max_requeues): not requeueing", job, restarts)
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.warning("time-limit warning: checkpoint saved, job %s requeued (restart %d)", job, restarts + 1)
    return True
