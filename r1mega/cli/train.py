"""`r1mega-train`: the main job. Hydra overrides on the command line, e.g.

    r1mega-train model=qwen2.5-1.5b parallel.tp=2 optimizer.lr=1e-6
"""

from __future__ import annotations


from r1mega.cli.common import job_main
from r1mega.config.stage_rules import check_no_cp
from r1mega.trainer.rl.train import train


def main() -> None:
    job_main(train, check_no_cp, stoppable=True)


if __name__ == "__main__":
    main()
