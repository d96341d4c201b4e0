"""`r1mega-submit`'s work: compose and check the job, render its script, submit it, record it."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from r1mega.config.cluster_rules import check_resumes_itself, plain, world_size
from r1mega.config.errors import ConfigError, require
from r1mega.config.loader import compose_config, to_config, to_yaml
from r1mega.config.schema import R1Config
from r1mega.config.stage_rules import check_sft_run
from r1mega.config.validate import validate
from r1mega.platform.atomic import write_text_atomic
from r1mega.slurm.partitions import check_fits, query_partitions
from r1mega.slurm.script import ENTRIES, render

ENTRY_CHECKS = {"train": None, "sft": check_sft_run}
RUN_KEYS = ("trainer.output_dir=", "trainer.load=")  # the job's own: its run folder, resumed from


class SubmitError(RuntimeError):
    """sbatch refused the job or could not be run."""


@dataclass
class Job:
    cfg: R1Config  # as the job will run it
    overrides: List[str]  # the job's command line
    run_dir: Path
    log_dir: Path  # Slurm's output file and the requeue file
    script: str


def prepare(overrides: Sequence[str], entry: str = "train", workdir: Optional[Path] = None) -> Job:
    """Compose and validate the config at the job's world size; pin its run folder; render the script.

    The job runs with trainer.output_dir fixed to an absolute path and trainer.load=auto, so a
    requeued job resumes from its own latest checkpoint."""
    if entry not in ENTRIES:
        raise ConfigError(f"--entry={entry!r} is not one of {sorted(ENTRIES)}")
    cfg = to_config(compose_config(overrides))
    check_resumes_itself(cfg.trainer.load, "a submitted job")
    world = world_size(cfg.cluster)
    validate(cfg, world, ENTRY_CHECKS[entry])
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / cfg.trainer.output_dir).resolve()  # ${now:...} resolved once, here
    log_dir = (workdir / cfg.cluster.log_dir).resolve() if cfg.cluster.log_dir else run_dir / "slurm"
    for name, path in (("trainer.output_dir", run_dir), ("the working directory", workdir),
                       ("cluster.log_dir", log_dir)):
        require(plain(str(path)), f"{name} {str(path)!r}: Slurm's #SBATCH lines take paths without spaces or %")
    cfg.trainer.output_dir, cfg.trainer.load = str(run_dir), "auto"
    job_overrides = [o for o in overrides if not o.startswith(RUN_KEYS)]
    job_overrides += [f"trainer.output_dir={run_dir}", "trainer.load=auto"]
    script = render(cfg.cluster, entry, job_overrides, run_dir, workdir, log_dir)
    return Job(cfg, job_overrides, run_dir, log_dir, script)


def check_cluster_has_room(job: Job) -> str:
    """Ask sinfo whether the job fits its partition; the partition's name."""
    return check_fits(job.cfg.cluster, query_partitions()).name


def submit(job: Job, argv: Sequence[str], entry: str) -> str:
    """sbatch the job's script (kept in <run>/slurm/), record the submission; the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: r1mega-submit needs the Slurm client commands on PATH "
                          "(or use --dry-run to print the script)")
    partition = check_cluster_has_room(job)
    folder = job.run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the output file's folder
    write_text_atomic(folder / "config.yaml", to_yaml(job.cfg))
    write_text_atomic(folder / "job.sbatch", job.script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(folder / "job.sbatch")], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch gave no answer in 120 s (is the Slurm controller reachable?)") from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {folder / 'job.sbatch'}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    record = {"job_id": job_id, "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "entry": entry, "argv": list(argv), "cluster": job.cfg.cluster.name, "partition": partition,
              "workdir": str(Path.cwd()), "log": str(job.log_dir / f"{job_id}.out")}
    with (folder / "submissions.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return job_id

