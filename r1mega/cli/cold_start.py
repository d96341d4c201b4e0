"""`python -m r1mega.cli.cold_start`: write the built-in cold-start and non-reasoning conversations."""

from __future__ import annotations

import sys

from r1mega.cli.exit import fail
from r1mega.config.loader import load_config
from r1mega.config.validate import ConfigError
from r1mega.platform.logs import setup_logging
from r1mega.recipe.cold_start import write


def main() -> None:
    setup_logging()
    try:
        cfg = load_config(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    if cfg.data.name not in ("arithmetic", "countdown"):
        fail(f"cold-start traces are written for the built-in tasks, not data.name={cfg.data.name!r}")
    print(write(cfg))


if __name__ == "__main__":
    main()
