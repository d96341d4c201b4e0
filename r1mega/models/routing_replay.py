"""MoE routing replay: the routers of a model take given experts for each token instead of their own
top-k, or record the experts they chose.

Replay makes the policy being optimised route exactly as the one that sampled (R3: the rollout
engine's routing) or as the old policy did (R2: the first log-prob pass's routing), so that a
token's log-prob under training differs from the sampler's only through the weights, not through
a different set of experts.

megatron-core's `RouterReplay` (transformer/moe/router_replay.py) does the swap inside
`topk_routing_with_score_function`: under REPLAY_FORWARD the router gathers its scores at the
given indices (sigmoid routers: the unbiased scores), so the gradient reaches the chosen experts'
scores as in a natural forward. r1mega gives each router its own `Replay` object rather than
megatron's global list, which would mix the routers of every model in the process (the policy's,
the KL reference's) in construction order.

Token order: a router sees its layer's input [s, b, h] flattened s-major (token s * b + row), and
under sequence parallelism only this tensor-parallel rank's contiguous slice of s.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction



class Replay(RouterReplay):
    """One router's replay state; while replaying it also counts the tokens whose own routing would
    have chosen other experts (as sets: order within the top-k does not route differently)."""

    def __init__(self):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # per router, see the module docstring
        self.valid: Optional[torch.Tensor] = None  # [tokens] bool: real tokens, counted
        self.differing = 0
        self.counted = 0

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            with torch.no_grad():
                _, natural = default_compute_topk(scores, topk, num_groups, group_topk)
                target = self.target_topk_idx.to(scores.device)
                if target.shape != natural.shape:
                    raise ValueError(f"routing replay: {tuple(target.shape)} expert indices for a router that "
                                     f"routes {tuple(natural.shape)} (tokens x top-k) here")
                differs = (natural.sort(dim=1).values != target.sort(dim=1).values).any(dim=1)
                valid = self.valid.to(scores.device) if self.valid is not None else torch.ones_like(differs)
                self.differing += int((differs & valid).sum())
                self.counted += int(valid.sum())
        return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)


def unrouted(positions: int, layers: int, topk: int) -> torch.Tensor:
    """[positions, layers, topk] int16 of experts 0..k-1: the routing of positions (padding) or layers
    (another pipeline stage's) that no router here reads."""
    return torch.arange(topk, dtype=torch.int16).expand(positions, layers, topk).clone()


def moe_layer_numbers(config) -> List[int]:
    """1-based numbers of the decoder layers with a router (megatron TransformerConfig), in order;
    routing tensors index them 0..M-1."""
    if not config.num_moe_experts:
        return []
    freq = config.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(config.num_layers)]
    return [i + 1 for i, moe in enumerate(pattern) if moe]


def routers(chunk: torch.nn.Module) -> List[Tuple[int, torch.nn.Module]]:
    """(layer number, router) of the chunk's MoE layers."""
    out = []
    for layer in getattr(chunk.decoder, "layers", []):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            out.append((layer.layer_number, router))
    return out


def install(chunks) -> None:
    """A Replay object on every router of the chunks (unwrapped GPTModels)."""
    for chunk in chunks:
        for _, router in routers(chunk):
            router.router_replay = Replay()


def _replays(chunk) -> List[Tuple[int, Replay]]:
    """(index among the model's MoE layers, Replay) of the chunk's routers that have one."""
    index = {n: i for i, n in enumerate(moe_layer_numbers(chunk.config))}
    return [(index[n], r.router_replay) for n, r in routers(chunk) if isinstance(r.router_replay, Replay)]


def router_order(values: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Per-position values [b, s, ...] in the order this rank's routers see the tokens: [tokens, ...]."""
    order = values.transpose(0, 1)  # [s, b, ...]
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = order.size(0) // size
        order = order[rank * n:(rank + 1) * n]
    return order.reshape(-1, *values.shape[2:])


def from_router_order(values: torch.Tensor, b: int, sequence_parallel: bool) -> torch.Tensor:
    """The inverse of router_order: [tokens, ...] seen here -> [b, s, ...] (gathered over the
    tensor-parallel ranks under sequence parallelism)."""
    order = values.reshape(-1, b, *values.shape[1:])
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        parts = [torch.empty_like(order) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, order.contiguous(), group=ps.get_tensor_model_parallel_group())
        order = torch.cat(parts)
    return order.transpose(0, 1)


@contextmanager
def replaying(chunk, routing: torch.Tensor, pad: Optional[torch.Tensor]) -> Iterator[None]:
    """The chunk's routers take the experts of `routing` [b, s, M, k] (every MoE layer of the model,
    aligned with the input positions) during one forward."""
    sp = chunk.config.sequence_parallel
    valid = router_order(~pad, sp) if pad is not None else None
    replays = _replays(chunk)
    for index, replay in replays:
        replay.set_target_indices(router_order(routing[:, :, index], sp).long())
        replay.valid = valid
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for _, replay in replays:
            replay.clear_indices()  # also the backward list set_target_indices fills
            replay.clear_router_replay_action()
            replay.valid = None


@contextmanager
def recording(chunk, out: Dict[int, torch.Tensor], b: int) -> Iterator[None]:
    """During one forward, the experts the chunk's routers choose: out[MoE layer index] = [b, s, k] (int16, CPU)."""
    sp = chunk.config.sequence_parallel
    replays = _replays(chunk)
    for _, replay in replays:
        replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield
        for index, replay in replays:  # int16 on the host: a long pass holds every token's experts
            out[index] = from_router_order(replay.get_recorded_indices(), b, sp).to(torch.int16).cpu()
    finally:
        for _, replay in replays:
            replay.clear_indices()
            replay.clear_router_replay_action()


def mismatch_counts(chunks) -> Tuple[int, int]:
    """(token-layer pairs whose natural routing differed from the replayed one, pairs counted) since
    the last call; the counters restart."""
    differing = counted = 0
    for chunk in chunks:
        for _, replay in _replays(chunk):
            differing, counted = differing + replay.differing, counted + replay.counted
            replay.differing = replay.counted = 0
    return differing, counted


def replays_here(chunk) -> bool:
    return bool(_replays(chunk))
