"""`r1mega-sample`: rejection sampling from a checkpoint into SFT data. Hydra overrides, e.g.

    r1mega-sample model.mcore_path=outputs/rl/model sample.samples_per_prompt=16 sample.keep_per_prompt=4
"""

from __future__ import annotations


from r1mega.cli.common import job_main
from r1mega.config.stage_rules import check_no_cp
from r1mega.recipe.rejection import run


def main() -> None:
    job_main(run, check_no_cp)


if __name__ == "__main__":
    main()
