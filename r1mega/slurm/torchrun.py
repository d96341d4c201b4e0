"""torchrun for Slurm jobs: torch.distributed.run, except that the time-limit warning ends it with 0.

`python -m r1mega.slurm.torchrun --stop-signal=SIGUSR1 <torchrun arguments>`

torchrun treats every signal it handles as a death signal: it passes the warning to its ranks,
waits for them to exit (--shutdown-timeout), then raises and exits 1. Under srun's
--kill-on-bad-exit, the first node whose torchrun exits that way makes srun SIGTERM the other
nodes' torchruns while their ranks may still be saving, and the job ends FAILED although it
stopped as asked. The warning is an orderly stop (every rank saves its step, then exits), so its
exit here is 0. Any other signal, and any failure, keeps torchrun's own exit.
"""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main

FLAG = "--stop-signal="


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].startswith(FLAG):
        raise SystemExit(f"usage: python -m r1mega.slurm.torchrun {FLAG}SIGUSR1 <torchrun arguments>")
    stop = signal.Signals[argv.pop(0)[len(FLAG):]]
    try:
        torchrun_main(argv)
    except SignalException as e:
        if e.sigval != stop:
            raise
        print(f"r1mega: torchrun stopped its ranks on {stop.name}, the time-limit warning", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
