"""What the cluster has (from `sinfo`), and whether a job's `cluster` config fits it."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

from r1mega.config.cluster_rules import cpus_per_task, ranks_per_node, tasks_per_node, time_minutes
from r1mega.config.errors import ConfigError, require
from r1mega.config.schema import ClusterConfig

SINFO_FORMAT = "%P|%c|%G|%D|%l"  # partition, CPUs per node, generic resources, node count, time limit


class SlurmUnavailable(ConfigError):
    """Slurm's commands are missing here or cannot reach a controller."""


@dataclass
class NodeGroup:
    """Nodes of one partition that sinfo reports alike."""

    nodes: int
    cpus: int
    gpus: int
    gres: str


@dataclass
class Partition:
    name: str
    default: bool
    max_minutes: Optional[int]  # None: no limit
    groups: List[NodeGroup]


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's GRES column: 'gpu:h100:8(S:0-1),nvme:1' -> 8, '(null)' -> 0."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> Dict[str, Partition]:
    """Partitions from `sinfo -h -o SINFO_FORMAT` (one line per group of alike nodes)."""
    out: Dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, gres, nodes, limit = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        minutes = None if limit.strip() in ("infinite", "UNLIMITED", "n/a") else time_minutes(limit)
        part = out.setdefault(name, Partition(name, default, minutes, []))
        part.default = part.default or default
        part.groups.append(NodeGroup(int(nodes), int(re.match(r"\d+", cpus).group()), gpus_in_gres(gres), gres))
    return out


def query_partitions() -> Dict[str, Partition]:
    """The cluster's partitions, asked of `sinfo`."""
    if shutil.which("sinfo") is None:
        raise SlurmUnavailable("sinfo not found: r1mega-submit needs the Slurm client commands (sbatch, sinfo) "
                               "on PATH")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("sinfo gave no answer in 60 s (is the Slurm controller reachable?)") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise SlurmUnavailable(f"sinfo failed (is the Slurm controller reachable?): {first}")
    return parse_sinfo(proc.stdout)


def pick_partition(c: ClusterConfig, partitions: Dict[str, Partition]) -> Partition:
    """The partition the job goes to: cluster.partition, or the cluster's default."""
    listed = ", ".join(f"{p.name}{' (default)' if p.default else ''}" for p in partitions.values()) or "none"
    if c.partition is None:
        default = [p for p in partitions.values() if p.default]
        require(bool(default), f"cluster.partition is unset and the cluster has no default partition; sinfo lists: "
                f"{listed}")
        return default[0]
    require(c.partition in partitions, f"cluster.partition={c.partition!r}: no such partition; sinfo lists: {listed}")
    return partitions[c.partition]


def check_fits(c: ClusterConfig, partitions: Dict[str, Partition]) -> Partition:
    """Raise ConfigError when the job cannot run on its partition; return that partition."""
    part = pick_partition(c, partitions)
    most_gpus = max(g.gpus for g in part.groups)
    require(c.gpus_per_node <= most_gpus,
            f"cluster.gpus_per_node={c.gpus_per_node}, but the nodes of partition {part.name!r} have at most "
            f"{most_gpus} GPUs (sinfo GRES: {', '.join(sorted({g.gres for g in part.groups}))})")
    tasks = tasks_per_node(c)
    cpus = (cpus_per_task(c) or 1) * tasks
    most_cpus = max(g.cpus for g in part.groups)
    require(cpus <= most_cpus, f"cluster.cpus_per_rank={c.cpus_per_rank} x {ranks_per_node(c)} rank(s) per node needs "
            f"{cpus} CPUs, but the nodes of partition {part.name!r} have at most {most_cpus}")
    fitting = sum(g.nodes for g in part.groups if g.gpus >= c.gpus_per_node and g.cpus >= cpus)
    require(c.nodes <= fitting, f"cluster.nodes={c.nodes}, but partition {part.name!r} has {fitting} node(s) with "
            f"{c.gpus_per_node} GPUs and {cpus} CPUs")
    if part.max_minutes is not None:
        require(time_minutes(c.time) <= part.max_minutes,
                f"cluster.time={c.time} is over the time limit of partition {part.name!r} ({part.max_minutes} min)")
    return part
