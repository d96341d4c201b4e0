"""MoE routing replay in the RL step (algorithm.routing_replay): where each row's routing comes from.

  rollout (R3)  the engine records every fed token's experts as it generates; the log-prob passes
                and the update replay them, so the policy being optimised routes exactly as the one
                that sampled
  old (R2)      the old policy's log-prob pass records its routing, and every minibatch of the update
                replays it: later minibatches, after earlier optimizer steps moved the routers, still
                route as the old policy did

The routers' replay objects come from r1mega.models.routing_replay; micro-batches carry the routing
laid out like their tokens (trainer.rl.batch).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from r1mega.models.context_parallel import local_positions
from r1mega.models.routing_replay import install, mismatch_counts, moe_layer_numbers, recording, unrouted
from r1mega.platform.distributed import current_device
from r1mega.rollout.setup import record_routing
from r1mega.trainer.forward_backward import forward_step


def enable(cfg, chunks, engine) -> None:
    """Replay objects on the policy's routers; with `rollout`, `engine` (native or SGLang; None: rollout
    workers, which record on their own copies, rollout.worker) records routing."""
    mode = cfg.algorithm.routing_replay
    if mode == "none":
        return
    install(chunks)
    if mode == "rollout" and engine is not None:
        record_routing(engine, chunks)


def recording_forward_step(recorded: Dict[tuple, Dict[int, torch.Tensor]], loss_fn):
    """A forward step for run_schedule that also records the experts the routers chose: per micro-batch
    (by its rows), this rank's MoE layers [b, L, k] (a virtual pipeline's chunks add theirs)."""

    def step(data_iterator, model):
        chunk = unwrap_model(model)

        def record(micro):
            return recording(chunk, recorded.setdefault(tuple(micro.rows), {}), micro.tokens.size(0))

        return forward_step(data_iterator, model, loss_fn, around=record)

    return step


def rows_from_recorded(micro, recorded: Dict[int, torch.Tensor], config) -> List[torch.Tensor]:
    """Each row's routing [len - 1, M, k] of a micro-batch's recorded experts (layers recorded elsewhere,
    on other pipeline stages, hold experts 0..k-1, which nothing here reads). Under context parallelism
    each rank recorded its chunks of the pack; a rank holds the same chunks of a row in any pack, so its
    own part would serve its replay, but the parts are gathered so that every row is whole on every rank,
    as without context parallelism, and nothing downstream depends on which rank holds what."""
    m, k = len(moe_layer_numbers(config)), config.moe_router_topk
    spans = micro.input_spans()
    if micro.cp_size > 1:
        recorded = {layer: _whole_pack(micro, experts) for layer, experts in recorded.items()}
        real = micro.cu_seqlens_unpadded.tolist()
        spans = [(0, int(start), real[j + 1] - real[j]) for j, start in enumerate(micro.cu_seqlens[:len(micro.rows)])]
    out = []
    for j, start, n in spans:
        row = unrouted(n, m, k)
        for layer, experts in recorded.items():  # int16 on the host already (routing_replay.recording)
            row[:, layer] = experts[j, start:start + n]
        out.append(row)
    return out


def _whole_pack(micro, experts: torch.Tensor) -> torch.Tensor:
    """[1, T, k]: the whole pack's experts from every context-parallel rank's chunks [1, T / cp, k]."""
    group, size = ps.get_context_parallel_group(), micro.cp_size
    parts: List[Optional[torch.Tensor]] = [None] * size
    dist.all_gather_object(parts, experts, group=group)  # int16 host tensors: any backend takes objects
    whole = torch.empty(1, micro.cu_seqlens[-1], experts.shape[-1], dtype=experts.dtype)
    for rank, part in enumerate(parts):
        whole[0, local_positions(micro.cu_seqlens, rank, size)] = part[0]
    return whole


def replay_metrics(chunks) -> Dict[str, float]:
    """Share of (token, MoE layer) pairs whose own routing differs from the replayed one, over every
    rank's forwards since the last call (pipeline stages add their layers; tensor-parallel ranks
    without sequence parallelism count the same tokens alike, which a share does not mind)."""
    counts = torch.tensor(mismatch_counts(chunks), dtype=torch.float64, device=current_device())
    dist.all_reduce(counts)
    return {"routing/replay_mismatch_share": float(counts[0] / counts[1]) if counts[1] else 0.0}


def record_old_routing(batch, micro, recorded: Dict[tuple, Dict[int, torch.Tensor]], config) -> None:
    """batch.routing from the old policy's log-prob pass (R2)."""
    routing: List[Optional[torch.Tensor]] = [None] * len(batch)
    for m in micro:
        for row, values in zip(m.rows, rows_from_recorded(m, recorded.get(tuple(m.rows), {}), config)):
            routing[row] = values
    batch.routing = routing
