"""`r1mega-sft`: supervised fine-tuning on conversations. Hydra overrides on the command line, e.g.

    r1mega-sft sft.train_files=[data/cold_start.jsonl] sft.epochs=2 optimizer.lr=1e-5 parallel.tp=2
"""

from __future__ import annotations

from r1mega.platform.signals import STOP

# Catch stop signals before the slow imports below: Slurm's time-limit warning (or a SIGTERM) that
# lands while the trainer's modules load must be recorded, not end the process (run_job installs
# the same handlers again, a no-op).
STOP.install()

from r1mega.cli.common import job_main  # noqa: E402
from r1mega.config.stage_rules import check_sft_run  # noqa: E402
from r1mega.trainer.sft import train  # noqa: E402


def main() -> None:
    job_main(train, check_sft_run, stoppable=True)


if __name__ == "__main__":
    main()
