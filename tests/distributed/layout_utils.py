"""Helpers for comparing models across parallel layouts: full tensors, logits, relative error.

Functions here run inside spawned ranks (imported by name there), after platform.initialize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch


def save_model(chunks: List[torch.nn.Module], folder: str) -> None:
    """Model weights only, as a megatron dist checkpoint (every rank calls this)."""
    from megatron.core import dist_checkpointing

    from r1mega.checkpoint.mcore import model_sharded_state_dict
    from r1mega.platform.distributed import barrier, rank

    if rank() == 0:
        Path(folder).mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), folder)
    barrier()


def load_model(chunks: List[torch.nn.Module], folder: str) -> None:
    from r1mega.checkpoint.mcore import load_model as load

    load(chunks, folder)


def plain_tensors(folder: str) -> Optional[Dict[str, torch.Tensor]]:
    """Full tensors of a dist checkpoint by layout-independent name, on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    full = dist_checkpointing.load_plain_tensors(folder)
    return {k: v.clone() for k, v in full.items()} if dist.get_rank() == 0 else None


def full_params(chunks: List[torch.nn.Module], folder: str) -> Optional[Dict[str, torch.Tensor]]:
    """Full (unsharded) parameters, on rank 0 (None elsewhere); written through `folder`."""
    save_model(chunks, folder)
    return plain_tensors(folder)


def logits(chunks: List[torch.nn.Module], ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Full-vocab logits of ids [b, s] on the last pipeline stage (None on other stages)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def step(data_iterator, model):
        out = model(ids, positions, None)
        return out, lambda o: (o.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(o).detach()})

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=chunks,
                                          num_microbatches=1, seq_length=ids.shape[1],
                                          micro_batch_size=ids.shape[0], forward_only=True)
    return out[0]["logits"].clone() if ps.is_pipeline_last_stage() else None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
