"""`r1mega-train`: the main job. Hydra overrides on the command line, e.g.

    r1mega-train model=qwen2.5-1.5b parallel.tp=2 optimizer.lr=1e-6
"""

from __future__ import annotations

from r1mega.platform.signals import STOP

# Catch stop signals before the slow imports below: Slurm's time-limit warning (or a SIGTERM) that
# lands while the trainer's modules load must be recorded, not end the process (run_job installs
# the same handlers again, a no-op).
STOP.install()

from r1mega.cli.common import job_main  # noqa: E402
from r1mega.trainer.rl.teacher_check import check_teacher  # noqa: E402
from r1mega.trainer.rl.train import train  # noqa: E402


def main() -> None:
    job_main(train, check_teacher, stoppable=True)


if __name__ == "__main__":
    main()
