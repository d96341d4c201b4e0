"""The sbatch script of a submitted job: slurm/r1mega.sbatch.j2 filled from the `cluster` config."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import jinja2

from r1mega.config.cluster_rules import cpus_per_task, ranks_per_node, tasks_per_node
from r1mega.config.schema import ClusterConfig

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "r1mega.sbatch.j2"

# What `r1mega-submit --entry` can run: long jobs that checkpoint and resume.
ENTRIES = {"train": "r1mega.cli.train", "sft": "r1mega.cli.sft"}


def job_env(c: ClusterConfig) -> Dict[str, str]:
    """Variables the job exports: the network preset, then the site's own (which win)."""
    return {**{k: str(v) for k, v in c.network.items()}, **{k: str(v) for k, v in c.env.items()}}


def srun_args(c: ClusterConfig) -> str:
    """srun's options for the job step: tasks per node, CPUs (srun does not inherit them), container.
    --label prefixes each output line with its task number, so many ranks' output stays readable."""
    args = ["--kill-on-bad-exit=1", "--label", f"--ntasks-per-node={tasks_per_node(c)}"]
    if cpus_per_task(c):
        args.append(f"--cpus-per-task={cpus_per_task(c)}")
    if c.container_image:
        args.append(f"--container-image={c.container_image}")
        if c.container_mounts:
            args.append(f"--container-mounts={','.join(c.container_mounts)}")
    return " ".join(shlex.quote(a) for a in args)


def extra_options(c: ClusterConfig) -> List[str]:
    """cluster.sbatch as #SBATCH options: {constraint: h100, requeue: true} -> --constraint=h100, --requeue.
    An option set to null or false is left out."""
    out = []
    for key, value in c.sbatch.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None and value is not False:
            out.append(f"--{key}={value}")
    return out


def render(c: ClusterConfig, entry: str, overrides: Sequence[str], run_dir: Path, workdir: Path,
           log_dir: Path) -> str:
    """The sbatch script that runs `entry` with these overrides on the cluster `c`."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(TEMPLATE.name).render(
        c=c, entry=entry, module=ENTRIES[entry], job_name=f"r1mega-{entry}-{run_dir.name}",
        tasks_per_node=tasks_per_node(c), ranks_per_node=ranks_per_node(c), cpus_per_task=cpus_per_task(c),
        srun_args=srun_args(c), extra_options=extra_options(c), env=job_env(c),
        python=c.python or ("python" if c.container_image else sys.executable),  # a container has its own
        args=" ".join(shlex.quote(o) for o in overrides),
        run_dir=run_dir, workdir=workdir, log_dir=log_dir,
    )
