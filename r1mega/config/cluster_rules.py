"""Rules of the `cluster` group (a Slurm site), and the sizes a submitted job derives from it."""

from __future__ import annotations

import re
from typing import Optional

from r1mega.config.choices import check_choices
from r1mega.config.errors import ConfigError, require
from r1mega.config.schema import ClusterConfig

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(text: str) -> int:
    """Minutes in a Slurm time limit, rounded up: "90", "1:30:00", "2-00:00:00", "1-12"."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"cluster.time={text!r} is not a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM[:SS]")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:  # MM | MM:SS | HH:MM:SS
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:  # D-HH | D-HH:MM | D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    return -(-seconds // 60)


def ranks_per_node(c: ClusterConfig) -> int:
    """Training ranks on each node: one per GPU, or cluster.ranks_per_node (1) on CPU nodes."""
    return c.ranks_per_node or c.gpus_per_node or 1


def tasks_per_node(c: ClusterConfig) -> int:
    """Slurm tasks on each node: one torchrun, or one srun task per rank."""
    return 1 if c.launcher == "torchrun" else ranks_per_node(c)


def cpus_per_task(c: ClusterConfig) -> Optional[int]:
    """sbatch/srun --cpus-per-task: a rank's CPUs, times the ranks for torchrun's one task per node."""
    if not c.cpus_per_rank:
        return None
    return c.cpus_per_rank * (ranks_per_node(c) if c.launcher == "torchrun" else 1)


def world_size(c: ClusterConfig) -> int:
    return c.nodes * ranks_per_node(c)


def check_cluster(c: ClusterConfig) -> None:
    """Raise ConfigError on the first rule the cluster config breaks."""
    check_choices(c, "cluster.")  # launcher, signal
    require(c.nodes >= 1, f"cluster.nodes must be >= 1, got {c.nodes}")
    require(c.gpus_per_node >= 0, f"cluster.gpus_per_node must be >= 0, got {c.gpus_per_node}")
    require(c.ranks_per_node is None or c.ranks_per_node >= 1,
            f"cluster.ranks_per_node must be >= 1, got {c.ranks_per_node}")
    if c.gpus_per_node and c.ranks_per_node is not None:
        require(c.ranks_per_node == c.gpus_per_node,
                f"cluster.ranks_per_node={c.ranks_per_node} with cluster.gpus_per_node={c.gpus_per_node}: "
                "r1mega runs one rank per GPU; leave ranks_per_node unset")
    require(c.cpus_per_rank is None or c.cpus_per_rank >= 1,
            f"cluster.cpus_per_rank must be >= 1, got {c.cpus_per_rank}")
    limit = time_minutes(c.time) * 60
    require(0 < c.signal_lead_s < limit,
            f"cluster.signal_lead_s={c.signal_lead_s} must be between 0 and cluster.time={c.time} ({limit} s)")
    require(c.max_requeues >= 0, f"cluster.max_requeues must be >= 0, got {c.max_requeues}")
    for key in list(c.network) + list(c.env):
        require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) is not None,
                f"cluster.network/env key {key!r} is not an environment variable name")
    for mount in c.container_mounts:
        require(":" in mount, f"cluster.container_mounts entry {mount!r} must be src:dst[:flags]")
    # These land on #SBATCH lines and srun's command line as they are.
    words = {"partition": c.partition, "account": c.account, "qos": c.qos, "mem": c.mem, "time": c.time,
             "container_image": c.container_image, "log_dir": c.log_dir, "python": c.python}
    words.update({f"container_mounts[{i}]": m for i, m in enumerate(c.container_mounts)})
    words.update({f"sbatch.{k}": v for k, v in c.sbatch.items() if isinstance(v, str)})
    words.update({f"sbatch.{k} (the key)": k for k in c.sbatch})
    for key, value in words.items():
        require(value is None or plain(str(value)), f"cluster.{key}={value!r} must be one word without %")


def check_resumes_itself(load: Optional[str], what: str) -> None:
    """A job that may be requeued runs with trainer.load=auto: it resumes from its own folder."""
    require(load in (None, "auto"), f"trainer.load={load}: {what} resumes from its own folder (trainer.load=auto); "
            "start from other weights with model.mcore_path or model.hf_path")


def plain(text: str) -> bool:
    """Safe on an #SBATCH line or in a path Slurm expands: no whitespace, no %, not empty."""
    return bool(text) and re.search(r"[\s%]", text) is None
