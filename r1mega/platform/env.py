"""Where this process sits: rank, world size, local rank and rendezvous address.

Read from torchrun's variables first, then Slurm's; a bare `python` is rank 0 of 1.
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | none


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, bracket = head.group(1), head.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_port(job_id: Optional[str]) -> int:
    # A job-specific port so two jobs sharing a node do not collide.
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The distributed environment of this process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(environ.get("MASTER_PORT") or _slurm_port(environ.get("SLURM_JOB_ID"))),
            launcher="slurm",
        )
    # A lone process rendezvous with itself: any free port, so runs side by side do not collide.
    return DistEnv(0, 1, 0, "127.0.0.1", int(environ.get("MASTER_PORT") or free_port()), "none")


# Where free_port looks: below Linux's ephemeral range (32768 and up by default) and below the Slurm
# jobs' ports (20000 and up). A port the kernel hands out for bind(0) comes from the ephemeral range,
# which every outgoing connection also draws from: between the check and the rendezvous, one of
# gloo's many connections can take it (EADDRINUSE). Ports outside it are only ever taken by listeners.
FREE_PORTS = range(10000, 20000)


def free_port() -> int:
    """A TCP port nobody listens on right now (on this host), outside the ephemeral range."""
    rng = random.Random()  # system-seeded: processes that seed the global generator alike differ here
    for _ in range(200):
        port = rng.choice(FREE_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
