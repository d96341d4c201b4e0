"""`-m` sweeps of any entry point: Hydra's multirun, one run per point, each in its own folder.

    r1mega-train -m optimizer.lr=1e-6,3e-6                          # here, one after the other
    r1mega-train -m hydra/launcher=slurm cluster=gpu_site optimizer.lr=1e-6,3e-6   # one Slurm job each

A point's folder is <hydra.sweep.dir>/<point number>; it runs with trainer.load=auto, so a
point requeued after a time-limit warning resumes from its own checkpoint. Before any point
is launched, the config (swept keys at their defaults) is validated and, for Slurm, checked
against the cluster.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from r1mega.config.loader import CONF_DIR, to_config
from r1mega.config.schema import R1Config, register


def sweep(argv: Sequence[str], rank_main: Callable[[R1Config], None],
          check: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Hand the command line to Hydra, which composes each point and runs it through its launcher."""
    import hydra

    from r1mega.config.errors import ConfigError

    register()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def point(composed: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from r1mega.cli.common import start
        from r1mega.platform.signals import STOP

        if STOP.received is not None:  # a stop signal ended an earlier point of this local sweep
            raise ConfigError("stop signal received: point not started")
        cfg = to_config(composed)
        if cfg.trainer.load not in (None, "auto"):
            raise ConfigError(f"trainer.load={cfg.trainer.load}: a sweep point resumes from its own folder "
                              "(trainer.load=auto); start from other weights with model.mcore_path or model.hf_path")
        cfg.trainer.output_dir = HydraConfig.get().runtime.output_dir
        cfg.trainer.load = "auto"
        start(cfg, rank_main, check)

    checks = "+hydra.callbacks.r1mega_checks"
    argv = [*argv, f"{checks}._target_={CheckBeforeLaunch.__module__}.{CheckBeforeLaunch.__name__}"]
    if check is not None:
        argv.append(f"{checks}.check={check.__module__}.{check.__name__}")
    sys.argv = [sys.argv[0], *argv]
    point()


class CheckBeforeLaunch(Callback):
    """Validate the sweep's config before Hydra launches any point; for the Slurm launcher also
    what r1mega-submit checks: that the job fits its partition."""

    def __init__(self, check: Optional[str] = None):
        self.check = check  # dotted path of the entry point's own rules

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from r1mega.cli.common import fail
        from r1mega.config.errors import ConfigError

        try:
            self._check(config)
        except ConfigError as e:
            fail(str(e))  # Hydra turns a callback's exceptions into warnings: exit here instead

    def _check(self, config: DictConfig) -> None:
        from hydra.utils import get_method

        from r1mega.config.cluster_rules import world_size
        from r1mega.config.errors import require
        from r1mega.config.validate import validate
        from r1mega.slurm.partitions import check_fits, query_partitions

        on_slurm = str(config.hydra.launcher._target_).endswith("SlurmLauncher")
        composed = copy.deepcopy(config)
        with open_dict(composed):
            del composed["hydra"]
        cfg = to_config(composed)
        world = world_size(cfg.cluster) if on_slurm else (cfg.parallel.nproc or 1)
        validate(cfg, world)
        if self.check:
            get_method(self.check)(cfg, world)
        if on_slurm:
            c = cfg.cluster
            require(c.container_image is None and c.python is None,
                    "hydra/launcher=slurm runs points with this interpreter and without a container: "
                    "unset cluster.container_image and cluster.python, or submit each point with r1mega-submit")
            check_fits(c, query_partitions())
