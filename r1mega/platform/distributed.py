"""Process-group and megatron parallel_state setup: the one place that picks device and backend."""

from __future__ import annotations

import datetime
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from r1mega.config.schema import ParallelConfig
from r1mega.platform import cpu_compat
from r1mega.platform.env import DistEnv, read_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What a rank knows about where it runs after `initialize`."""

    env: DistEnv
    device: torch.device
    backend: str
    tp: int
    pp: int
    ep: int
    cp: int
    dp: int

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def device_and_backend(env: DistEnv) -> tuple[torch.device, str]:
    """CUDA + NCCL when GPUs exist, else CPU + gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def rollout_worker_devices(local_ranks: int, workers: int) -> tuple[list[Optional[str]], str]:
    """Where the async rollout workers of a host run beside its `local_ranks` trainer ranks, and the
    bridge backend: each worker's CUDA_VISIBLE_DEVICES entry (None on CPU) and nccl or gloo.

    Workers take the GPUs after the trainer's when there are enough; otherwise they share the host's
    GPUs round-robin and weights travel over gloo through host memory, because NCCL refuses a
    communicator with two ranks on one device."""
    if not torch.cuda.is_available():
        return [None] * workers, "gloo"
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in visible.split(",") if x.strip()] if visible else [str(i) for i in range(count)]
    names = names[:count]
    if local_ranks + workers <= count:
        return [names[local_ranks + i] for i in range(workers)], "nccl"
    return [names[(local_ranks + i) % count] for i in range(workers)], "gloo"


def initialize(parallel: ParallelConfig, seed: int, env: DistEnv | None = None) -> Runtime:
    """Start the process group, megatron's parallel_state and the RNG trackers."""
    env = env or read_env()
    device, backend = device_and_backend(env)
    if backend == "gloo":
        cpu_compat.install()
        # Ranks on one host share its cores; oversubscribed intra-op threads slow all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
        )
    model_parallel_groups(parallel)
    _start_replica_group(parallel.cp)
    seed_everything(seed)
    dp = ps.get_data_parallel_world_size()
    return Runtime(env, device, backend, parallel.tp, parallel.pp, parallel.ep, parallel.cp, dp)



def model_parallel_groups(parallel: ParallelConfig, gloo: bool = True) -> None:
    """megatron's parallel_state groups of the layout (collective: every rank makes every group); `gloo`: also
    the gloo data-parallel groups, which only a layout that keeps optimizer state needs."""
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=parallel.timeout_minutes,
        create_gloo_process_groups=gloo,
    )


_REPLICA_GROUP = None


def _start_replica_group(cp: int) -> None:
    """megatron's model-parallel group (TP x PP) leaves out context-parallel ranks, which hold the
    same rows too; with cp > 1 the replica group is made of every rank of one data-parallel rank."""
    global _REPLICA_GROUP
    if cp == 1:
        _REPLICA_GROUP = ps.get_model_parallel_group()
        return
    dp_rank_of: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_rank_of, ps.get_data_parallel_rank())
    for d in sorted(set(dp_rank_of)):  # every rank makes every group, in the same order
        group = dist.new_group([r for r, x in enumerate(dp_rank_of) if x == d])
        if d == ps.get_data_parallel_rank():
            _REPLICA_GROUP = group


def replica_group():
    """The ranks that hold one data-parallel rank's prompts and rollouts: its tensor-, pipeline- and
    context-parallel ranks."""
    if _REPLICA_GROUP is None:
        raise RuntimeError("replica_group() before platform.distributed.initialize")
    return _REPLICA_GROUP


def current_device() -> torch.device:
    """This rank's device for collectives and tensors: its CUDA device, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG trackers.

    The same seed on every rank keeps replicated weights identical; megatron's tracker
    derives distinct streams for tensor- and expert-parallel regions from it.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down parallel_state and the process group (tests start several in one process)."""
    global _REPLICA_GROUP
    _REPLICA_GROUP = None
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def running(parallel: ParallelConfig, seed: int) -> Iterator[Runtime]:
    """`initialize` for the length of a block, then `destroy`, also when the block raises."""
    runtime = initialize(parallel, seed)
    try:
        yield runtime
    finally:
        destroy()


class RankError(RuntimeError):
    """A failure on some rank, raised on every rank of the group so none waits in a collective."""


def raise_if_any(error: BaseException | None, group=None) -> None:
    """Collective: if any rank of `group` passes an error, every rank raises one naming it."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = [(r, msg) for r, msg in enumerate(every) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise RankError(f"rank {rank}{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}: {msg}") from error


@contextmanager
def collectively(group=None) -> Iterator[None]:
    """Run a block that may fail on some ranks only; afterwards all ranks raise, or none does."""
    error = None
    try:
        yield
    except Exception as err:  # re-raised below, on every rank
        error = err
    raise_if_any(error, group)


# -- small collectives of the trainers ------------------------------------------------------------

T = TypeVar("T")


def rank() -> int:
    """This process's global rank (0 before the process group starts)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def dp_all_reduce(values: Sequence[float], op=dist.ReduceOp.SUM) -> List[float]:
    """Per-rank numbers reduced with `op` over the data-parallel group (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=current_device())
    dist.all_reduce(t, op=op, group=ps.get_data_parallel_group())
    return t.cpu().tolist()


def dp_sum(values: Sequence[float]) -> List[float]:
    return dp_all_reduce(values, dist.ReduceOp.SUM)


def dp_max(values: Sequence[float]) -> List[float]:
    return dp_all_reduce(values, dist.ReduceOp.MAX)


def dp_all_gather(obj: T) -> List[T]:
    """Every data-parallel rank's `obj` (picklable), in rank order."""
    group = ps.get_data_parallel_group()
    out: List[T] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(out, obj, group=group)
    return out


def reduce_last_stage(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Values held by the last pipeline stages (ignored elsewhere), reduced over data-parallel ranks
    and shared with every stage: the same result on every rank."""
    out = values.to(current_device())
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        out = torch.zeros_like(out) if op == dist.ReduceOp.SUM else torch.full_like(out, -float("inf"))
    for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
        dist.all_reduce(out, op=op, group=group)
    return out.cpu()


def replica_broadcast(t: torch.Tensor) -> torch.Tensor:
    """Broadcast from the first rank of this replica group (`replica_group`) to the rest of it."""
    group = replica_group()
    if dist.get_world_size(group) == 1:
        return t
    out = t.to(current_device())
    dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
    return out.cpu()


def dp_share(items: Sequence[T], fill: T) -> Tuple[List[T], int]:
    """This data-parallel rank's share of `items` (every dp-th from its rank), padded with `fill` to
    the same count on every rank, and how many of them are real. Ranks run forwards in lock-step
    (expert parallelism, pipeline stages), so every rank needs as many rows as the busiest."""
    dp, me = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(items[me::dp])
    return mine + [fill] * (-(-len(items) // dp) - len(mine)), len(mine)
