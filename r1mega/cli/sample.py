"""`r1mega-sample`: rejection sampling from a checkpoint into SFT data. Hydra overrides, e.g.

    r1mega-sample model.mcore_path=outputs/rl/model sample.samples_per_prompt=16 sample.keep_per_prompt=4
"""

from __future__ import annotations

import sys

from r1mega.cli.common import launch, run_job
from r1mega.config.schema import R1Config
from r1mega.config.stage_rules import check_no_cp
from r1mega.recipe.rejection import run


def rank_main(cfg: R1Config) -> None:
    run_job(cfg, run)


def main() -> None:
    launch(sys.argv[1:], rank_main, check_no_cp)


if __name__ == "__main__":
    main()
