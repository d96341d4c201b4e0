"""`r1mega-sft`: supervised fine-tuning on conversations. Hydra overrides on the command line, e.g.

    r1mega-sft sft.train_files=[data/cold_start.jsonl] sft.epochs=2 optimizer.lr=1e-5 parallel.tp=2
"""

from __future__ import annotations

import sys

from r1mega.cli.common import launch, run_job
from r1mega.config.schema import R1Config
from r1mega.config.stage_rules import check_sft_run
from r1mega.trainer.sft import train


def rank_main(cfg: R1Config) -> None:
    run_job(cfg, train, stoppable=True)


def main() -> None:
    launch(sys.argv[1:], rank_main, check_sft_run)


if __name__ == "__main__":
    main()
