"""A process group between processes of different torch.distributed worlds.

Asynchronous RL runs rollout workers beside the trainer, each worker in a world of its own (its
own megatron parallel state), so torch.distributed's groups, which live inside one world, cannot
join them. A bridge is built directly on a TCPStore and a backend process group, gloo on CPU and
NCCL on GPU, as SGLang's and vLLM's weight-update groups are; its collectives are the process
group's own methods. Rank 0 hosts the store.

`broadcast_named` moves a model's weights: a manifest (names, shapes, dtypes) through the store,
then one flat buffer per dtype through the process group, so a sync is a few large messages.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int8, torch.uint8, torch.bool)}


class Bridge:
    """Ranks 0 .. size-1 of a group of their own; every rank constructs it with the same host, port and
    size (rank 0's store listens there)."""

    def __init__(self, host: str, port: int, rank: int, size: int, backend: str = "gloo",
                 timeout_s: float = 600.0, device: Optional[torch.device] = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"bridge backend must be gloo or nccl, got {backend!r}")
        self.timeout = timedelta(seconds=timeout_s)
        self.backend = backend
        self.device = device or torch.device("cpu" if backend == "gloo" else "cuda")
        self.store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=self.timeout)
        self.rebuild(rank, size, epoch=0)

    def rebuild(self, rank: int, size: int, epoch: int) -> None:
        """A new group over the same store (keys of its own): every member calls it with the same
        epoch and size. How the members go on when one of them is gone; the old group is dropped."""
        # the old group goes first: closing its connections ends a peer's wait in it, so that peer can
        # join the new one (which waits for every member)
        self.group = None
        self.rank, self.size, self.epoch = rank, size, epoch
        prefix = dist.PrefixStore(f"r1mega-bridge-{epoch}", self.store)
        if self.backend == "gloo":
            self.group = dist.ProcessGroupGloo(prefix, rank, size, self.timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.group = dist.ProcessGroupNCCL(prefix, rank, size, options)
        self._calls = 0

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: src's tensor on every rank (same shape and dtype everywhere)."""
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        self.group.broadcast([tensor], options).wait()
        return tensor

    def barrier(self) -> None:
        self.broadcast(torch.zeros(1, device=self.device))

    def broadcast_named(self, tensors: Optional[Dict[str, torch.Tensor]], src: int = 0) -> Dict[str, torch.Tensor]:
        """src passes its named tensors, the others None; every rank returns them (on its device).
        Each call has its own manifest key, so calls never read an earlier call's."""
        self._calls += 1
        key = f"manifest-{self.epoch}-{self._calls}"
        if self.rank == src:
            if tensors is None:
                raise ValueError("the source rank of broadcast_named must pass its tensors")
            manifest = [(name, list(t.shape), str(t.dtype)) for name, t in tensors.items()]
            self.store.set(key, json.dumps(manifest))
        else:
            manifest = json.loads(self.store.get(key))
        out: Dict[str, torch.Tensor] = {}
        for dtype, entries in _by_dtype(manifest).items():
            numel = sum(_numel(shape) for _, shape in entries)
            if self.rank == src:
                flat = torch.cat([tensors[name].detach().reshape(-1).to(self.device) for name, _ in entries])
            else:
                flat = torch.empty(numel, dtype=dtype, device=self.device)
            self.broadcast(flat, src)
            offset = 0
            for name, shape in entries:
                n = _numel(shape)
                out[name] = flat[offset:offset + n].view(shape)
                offset += n
        return {name: out[name] for name, _, _ in manifest}

    def close(self) -> None:
        shutdown = getattr(self.group, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _by_dtype(manifest) -> Dict[torch.dtype, List[Tuple[str, List[int]]]]:
    groups: Dict[torch.dtype, List[Tuple[str, List[int]]]] = {}
    for name, shape, dtype in manifest:
        if dtype not in _DTYPES:
            raise ValueError(f"bridge: tensor {name!r} has dtype {dtype}, which it does not carry")
        groups.setdefault(_DTYPES[dtype], []).append((name, shape))
    return groups
