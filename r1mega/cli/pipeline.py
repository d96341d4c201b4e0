"""`r1mega-pipeline`: run the stages of an experiment, e.g. the miniature R1 on the built-in task:

    r1mega-pipeline experiment=r1_tiny
    r1mega-pipeline experiment=r1_tiny pipeline.output_dir=outputs/r1-run2 trainer.progress=false

Overrides other than experiment=... and pipeline.* are passed to every stage (after its own).
Started again, it skips finished stages and resumes the one that was stopped.
"""

from __future__ import annotations

import sys
from typing import List, Sequence

from r1mega.cli.exit import fail
from r1mega.config.loader import load_config
from r1mega.config.validate import ConfigError
from r1mega.platform.logs import setup_logging
from r1mega.recipe.runner import StageFailed, format_table, run_pipeline


def stage_extra(argv: Sequence[str]) -> List[str]:
    """Command-line overrides meant for the stages (not the experiment choice or pipeline.*)."""
    def own(arg: str) -> bool:
        key = arg.lstrip("+~").split("=", 1)[0]
        return key == "experiment" or key.startswith("pipeline.") or key == "pipeline"

    return [a for a in argv if not own(a)]


def main() -> None:
    setup_logging()
    argv = sys.argv[1:]
    try:
        cfg = load_config(argv)
        rows = run_pipeline(cfg.pipeline, stage_extra(argv))
    except ConfigError as e:
        fail(str(e))
    except StageFailed as e:
        fail(str(e), code=1)
    print(format_table(rows))


if __name__ == "__main__":
    main()
