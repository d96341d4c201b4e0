"""`r1mega-train`: the main job. Hydra overrides on the command line, e.g.

    r1mega-train model=qwen2.5-1.5b parallel.tp=2 optimizer.lr=1e-6
"""

from __future__ import annotations

import sys

from r1mega.cli.common import launch, run_job
from r1mega.config.schema import R1Config
from r1mega.config.stage_rules import check_no_cp
from r1mega.trainer.rl.train import train


def rank_main(cfg: R1Config) -> None:
    run_job(cfg, train, stoppable=True)


def main() -> None:
    launch(sys.argv[1:], rank_main, check_no_cp)


if __name__ == "__main__":
    main()
