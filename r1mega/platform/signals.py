"""Graceful stop: SIGTERM, and SIGUSR1/SIGUSR2 (Slurm's warning before a time limit), ask for a checkpoint.

Signals reach a process, not an object, so there is one StopRequest per process (`STOP`).
Entry points install it before their slow start-up, so a warning that arrives while the
model is still being built is remembered instead of killing the rank. The handler only
records the signal; the loops check it between steps, and all ranks agree before acting,
so every rank saves the same step and exits together.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# The time-limit warning: r1mega's sbatch script asks for USR1, submitit's launcher for USR2.
# After a warning the job requeues itself; after SIGTERM (scancel, preemption) it only stops.
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Stopped(Exception):
    """A stop signal ended the job where nothing could be saved (the base model's pre-training)."""


class StopRequest:
    """Records the stop signals this process receives; `with STOP as stop:` in the loops.

    A time-limit warning is remembered even when SIGTERM follows it (srun ends the other tasks
    of a step with SIGTERM once one task exits): the job must still be requeued.
    """

    def __init__(self):
        self.received: Optional[int] = None  # the last stop signal
        self.warning: Optional[int] = None  # the time-limit warning, if one came (any rank, once agreed)
        self.stopped_early = False  # a loop saved and stopped before its last step
        self.requeued = False  # this job has asked Slurm to requeue it
        # called on rank 0 when a loop has saved its stop checkpoint, before its last barrier (the
        # entry point sets it: a Slurm job leaves its requeue note there)
        self.after_stop_save: Optional[Callable[[], object]] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        """Catch the stop signals from now on (main thread only; once per process)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def __enter__(self) -> "StopRequest":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        pass  # handlers stay: a signal during the final save or export must not kill the rank

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if signum in WARNING_SIGNALS and self.warning is None:
            self.warning = signum

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective call); every rank
        then also knows whether a time-limit warning came."""
        import torch  # here, so launchers can import the signal lists without torch
        import torch.distributed as dist

        from r1mega.platform.distributed import current_device

        flags = torch.tensor([0 if self.received is None else 1, self.warning or 0], device=current_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if int(flags[1]):  # never cleared: a warning may land while the all-reduce runs
            self.warning = self.warning or int(flags[1])
        return bool(flags[0])

    def stop_saved(self) -> None:
        """A loop saved its stop checkpoint (rank 0): run the entry point's hook."""
        if self.after_stop_save is not None:
            self.after_stop_save()

    def previous_handler(self, signum: int) -> Optional[Callable]:
        """The Python handler this process had before (e.g. submitit's requeue), if any."""
        handler = self._previous.get(signum)
        return handler if callable(handler) else None


STOP = StopRequest()
