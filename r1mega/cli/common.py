"""What every entry point does the same way: load config, start ranks, report errors."""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from r1mega.checkpoint.hf_io import CheckpointError
from r1mega.cli.exit import fail
from r1mega.cli.sweep import sweep
from r1mega.config.loader import load_config, to_yaml
from r1mega.config.schema import R1Config
from r1mega.config.validate import ConfigError, check_installed, validate
from r1mega.data.prompts import DataError
from r1mega.platform.atomic import write_text_atomic
from r1mega.platform.distributed import running
from r1mega.platform.env import read_env
from r1mega.platform.launch import spawn
from r1mega.platform.logs import backends_line, setup_logging
from r1mega.platform.signals import STOP, Stopped
from r1mega.slurm.requeue import leave_requeue_file, requeue_if_warned
from r1mega.trainer.run import AbortRun

log = logging.getLogger("r1mega")


def launch(argv: Sequence[str], rank_main: Callable[[R1Config], None],
           check: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Load and validate the config, then run rank_main on every rank (`-m`: once per sweep point)."""
    if "-m" in argv or "--multirun" in argv:
        sweep(argv, lambda cfg: start(cfg, rank_main, check), check)
        return
    try:
        cfg = load_config(argv)
        start(cfg, rank_main, check)
    except ConfigError as e:
        fail(str(e))


def job_main(job: Callable[[R1Config, object], object],
             check: Optional[Callable[[R1Config, Optional[int]], None]], stoppable: bool = False) -> None:
    """An entry point's main(): its command line, then job(cfg, runtime) on every rank (run_job)."""
    launch(sys.argv[1:], partial(run_job, job=job, stoppable=stoppable), check)


def start(cfg: R1Config, rank_main: Callable[[R1Config], None],
          check: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> None:
    """Validate at the world size this run will have, then run rank_main on this process's ranks.

    Under torchrun or Slurm this process is one rank. Started bare with parallel.nproc > 1,
    it spawns that many local ranks itself (CPU runs, quick checks).
    """
    env = read_env()
    nproc = cfg.parallel.nproc if env.launcher == "none" and cfg.parallel.nproc else None
    validate(cfg, nproc or env.world_size, check)
    check_installed(cfg.model)
    if nproc and nproc > 1:
        if STOP.received is not None:  # caught while loading (cli/train, cli/sft): no rank would hear it
            fail("stop signal received during start-up: nothing ran", code=1)
        spawn(nproc, rank_main, cfg, timeout=7 * 24 * 3600.0)
        return
    try:
        rank_main(cfg)
    except (CheckpointError, DataError) as e:  # bad input files: one line, not a traceback
        fail(str(e), code=1)
    except AbortRun as e:  # the run could not go on; it saved what it had
        saved = f"\ncheckpoint of the last finished step: {e.checkpoint}" if e.checkpoint else ""
        fail(f"{e}{saved}", code=1)


def run_job(cfg: R1Config, job: Callable[[R1Config, object], object], stoppable: bool = False) -> None:
    """One rank's part of a job: logging, process groups (seeded by trainer.seed), the shared output
    folder, then job(cfg, runtime).

    A stoppable job (a training loop that checks for stop signals between steps) catches them
    from before its slow start-up on, and is requeued when a time-limit warning stopped it.
    """
    if stoppable:
        STOP.install()
        STOP.after_stop_save = lambda: leave_requeue_file(cfg.cluster, STOP)
    setup_logging()
    with running(cfg.parallel, cfg.trainer.seed) as runtime:
        if runtime.is_main:
            log.info("%s", backends_line())
        share_output_dir(cfg)
        try:
            job(cfg, runtime)
        except Stopped as e:
            STOP.stopped_early = True
            if runtime.is_main:
                log.warning("%s", e)
        if stoppable and runtime.is_main:  # every rank has saved and passed the loop's last barrier
            requeue_if_warned(cfg.cluster, STOP)


def share_output_dir(cfg: R1Config) -> Path:
    """Rank 0's output folder on every rank (ranks resolve ${now:...} at different instants)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [cfg.trainer.output_dir]
        dist.broadcast_object_list(box, src=0)
        cfg.trainer.output_dir = box[0]
    out = Path(cfg.trainer.output_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
    return out
