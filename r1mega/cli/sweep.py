"""`-m` sweeps of any entry point: Hydra's multirun, one run per point, each in its own folder.

    r1mega-train -m optimizer.lr=1e-6,3e-6                          # here, one after the other
    r1mega-train -m hydra/launcher=slurm cluster=gpu_site optimizer.lr=1e-6,3e-6   # one Slurm job each

A point's folder is <hydra.sweep.dir>/<point number>; it runs with trainer.load=auto, so a
point requeued after a time-limit warning resumes from its own checkpoint. Before any point
is launched, every point's config is validated and, for Slurm, checked against the cluster.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig

from r1mega.cli.exit import fail
from r1mega.config.cluster_rules import check_resumes_itself, world_size
from r1mega.config.errors import ConfigError, require
from r1mega.config.loader import CONF_DIR, compose_config, to_config
from r1mega.config.schema import R1Config, register
from r1mega.config.validate import check_installed, validate
from r1mega.platform.signals import STOP
from r1mega.slurm.partitions import check_fits, query_partitions
from r1mega.slurm.submitit import register_resolver


def sweep(argv: Sequence[str], start: Callable[[R1Config], None],
          check: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Hand the command line to Hydra, which composes each point and runs it through its launcher:
    start(point's config) runs it; check is the entry point's own rules, run on every point first."""
    register()
    register_resolver()  # conf/hydra/launcher/slurm.yaml maps `cluster` through it

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def point(composed: DictConfig) -> None:
        if STOP.received is not None:  # a stop signal ended an earlier point of this local sweep
            raise ConfigError("stop signal received: point not started")
        cfg = to_config(composed)
        check_resumes_itself(cfg.trainer.load, "a sweep point")
        cfg.trainer.output_dir = HydraConfig.get().runtime.output_dir
        cfg.trainer.load = "auto"
        start(cfg)

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
        self._sinfo = None  # the cluster's partitions, asked once

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            on_slurm = str(config.hydra.launcher._target_).endswith("SlurmLauncher")
            for overrides, swept in sweep_points(list(config.hydra.overrides.task)):
                self._check(overrides, swept, on_slurm)
        except ConfigError as e:  # Hydra turns a callback's exceptions into warnings: exit here instead
            fail(str(e))
        except Exception as e:  # noqa: BLE001 - a check that cannot run must not let the sweep go unchecked
            fail(f"sweep check failed: {type(e).__name__}: {e}")

    def _check(self, overrides: List[str], swept: str, on_slurm: bool) -> None:
        """One point: its config at its world size, the entry point's rules, and its cluster."""
        try:
            cfg = to_config(compose_config(overrides))
            world = world_size(cfg.cluster) if on_slurm else (cfg.parallel.nproc or 1)
            validate(cfg, world, get_method(self.check) if self.check else None)
            if not on_slurm:  # the points run here
                check_installed(cfg.model)
            if on_slurm:
                c = cfg.cluster
                require(c.container_image is None and c.python is None,
                        "hydra/launcher=slurm runs points with this interpreter and without a container: unset "
                        "cluster.container_image and cluster.python, or submit each point with r1mega-submit")
                check_fits(c, self._partitions())
        except ConfigError as e:
            raise ConfigError(f"sweep point {swept}: {e}") from None

    def _partitions(self):
        if self._sinfo is None:
            self._sinfo = query_partitions()
        return self._sinfo


def sweep_points(overrides: List[str]) -> List[Tuple[List[str], str]]:
    """Each point's overrides as Hydra's basic sweeper expands them (the cross product), with
    its swept values as one string."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    swept = [o.is_sweep_override() for o in parsed]
    return [(list(point), " ".join(p for p, s in zip(point, swept) if s) or "(no swept keys)")
            for point in itertools.product(*choices)]
