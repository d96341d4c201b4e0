"""The whole model as HF-named tensors on every rank (or on one), produced one parameter at a time.

Each HF tensor has one writer (tensor-parallel rank 0 of data-parallel replica 0, or the
expert's owner); after the tensor-parallel gather on its stage, the writer broadcasts it to the
world. All ranks of one pipeline stage step through their parameters together, stages one
after another, so no collective waits on another; what a consumer keeps (a sync bucket) is its
own choice. With a destination rank (asynchronous rollouts send from one), writers send their
tensors there alone instead of to the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.hf_convert import hf_tensors_by_param
from r1mega.config.schema import ModelConfig
from r1mega.platform.distributed import current_device


@dataclass(frozen=True)
class Entry:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    src: int  # global rank that writes it


@dataclass(frozen=True)
class Plan:
    """Per pipeline stage, per local parameter: the HF tensors it gives, in order."""

    stages: List[List[List[Entry]]]
    decoder_only: bool = False  # the MTP layers left out (hf_convert.hf_tensors_by_param)

    def entries(self) -> List[Entry]:
        return [e for stage in self.stages for param in stage for e in param]


def make_plan(chunks: List[torch.nn.Module], model: ModelConfig, decoder_only: bool = False) -> Plan:
    """What every rank writes, gathered once (runs the tensor-parallel gathers; collective); with
    `decoder_only`, without the MTP layers (for engines, which decode without them)."""
    rank = dist.get_rank()
    mine = [[Entry(n, tuple(t.shape), t.dtype, rank) for n, t in tensors] if writes else []
            for tensors, writes in hf_tensors_by_param(chunks, model, decoder_only)]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (ps.get_pipeline_model_parallel_rank(), mine))
    stages = []
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        lists = [params for s, params in every if s == stage]
        stages.append([[e for params in lists for e in params[i]] for i in range(len(lists[0]))])
    return Plan(stages, decoder_only)


def world_hf_tensors(chunks: List[torch.nn.Module], model: ModelConfig, plan: Plan,
                     dst: Optional[int] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, in plan order, on every rank, or only on global rank `dst` (the
    others yield nothing; each writer sends its tensors there alone). Collective: consume it fully."""
    my_stage, me = ps.get_pipeline_model_parallel_rank(), dist.get_rank()
    device = current_device()
    for stage, params in enumerate(plan.stages):
        local = hf_tensors_by_param(chunks, model, plan.decoder_only) if stage == my_stage else None
        for entries in params:
            own = dict(next(local)[0]) if local is not None else {}
            for e in entries:
                if dst is not None and me not in (dst, e.src):
                    continue
                if e.src == me:
                    t = own[e.name].to(device).contiguous()
                else:
                    t = torch.empty(e.shape, dtype=e.dtype, device=device)
                if dst is None:
                    dist.broadcast(t, src=e.src)
                elif e.src != dst and me == e.src:
                    dist.send(t, dst)
                elif e.src != dst:
                    dist.recv(t, e.src)
                if dst is None or me == dst:
                    yield e.name, t
