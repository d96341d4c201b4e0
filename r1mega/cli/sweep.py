"""`-m` sweeps of any entry point: Hydra's multirun, one run per point, each in its own folder.

    r1mega-train -m optimizer.lr=1e-6,3e-6                          # here, one after the other
    r1mega-train -m hydra/launcher=slurm cluster=gpu_site optimizer.lr=1e-6,3e-6   # one Slurm job each

A point's folder is <hydra.sweep.dir>/<point number>; it runs with trainer.load=auto, so a
point requeued after a time-limit warning resumes from its own checkpoint.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from r1mega.config.loader import CONF_DIR, to_config
from r1mega.config.schema import R1Config, register


def sweep(argv: Sequence[str], rank_main: Callable[[R1Config], None],
          check: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Hand the command line to Hydra, which composes each point and runs it through its launcher."""
    import hydra

    register()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def point(composed: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from r1mega.cli.common import start

        cfg = to_config(composed)
        cfg.trainer.output_dir = HydraConfig.get().runtime.output_dir
        cfg.trainer.load = "auto"
        start(cfg, rank_main, check)

    sys.argv = [sys.argv[0], *argv]
    point()
