"""`r1mega-sft`: supervised fine-tuning on conversations. Hydra overrides on the command line, e.g.

    r1mega-sft sft.train_files=[data/cold_start.jsonl] sft.epochs=2 optimizer.lr=1e-5 parallel.tp=2
"""

from __future__ import annotations


from r1mega.cli.common import job_main
from r1mega.config.stage_rules import check_sft_run
from r1mega.trainer.sft import train


def main() -> None:
    job_main(train, check_sft_run, stoppable=True)


if __name__ == "__main__":
    main()
