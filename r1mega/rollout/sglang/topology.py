"""Where the SGLang engines run and which trainer ranks talk to which engine (pure arithmetic).

Colocated: the world's GPUs are cut into engines of `tp` consecutive ranks; the first rank of
each block launches that engine on its own GPU and the next tp - 1. Disaggregated: rank 0
launches every engine on the first node's GPUs [base_gpu_id, base_gpu_id + num_gpus).
Generation requests come from the first rank of each model-parallel group (a data-parallel
"leader"); leaders split their prompts over the engines assigned to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Topology:
    mode: str  # colocated | disaggregated
    tp: int  # GPUs per engine
    world_size: int
    ranks_per_node: int
    base_gpu_id: int = 0
    num_gpus: int = 0  # disaggregated only

    def __post_init__(self):
        if self.mode == "colocated":
            if self.world_size % self.tp or self.ranks_per_node % self.tp:
                raise ValueError(f"rollout.sglang.tp={self.tp} must divide the world size {self.world_size} and "
                                 f"the ranks per node {self.ranks_per_node} (an engine's GPUs share one node)")
        elif self.mode == "disaggregated":
            if self.num_gpus < self.tp or self.num_gpus % self.tp:
                raise ValueError(f"rollout.sglang.num_gpus={self.num_gpus} must be a positive multiple of "
                                 f"rollout.sglang.tp={self.tp}")
            if self.base_gpu_id < self.ranks_per_node:
                raise ValueError(f"rollout.sglang.base_gpu_id={self.base_gpu_id} puts engines on the trainer's GPUs "
                                 f"0-{self.ranks_per_node - 1} of the first node; start them after those")
        else:
            raise ValueError(f"rollout.sglang.mode={self.mode!r} is not one of ['colocated', 'disaggregated']")

    @property
    def num_engines(self) -> int:
        return (self.world_size if self.mode == "colocated" else self.num_gpus) // self.tp

    def owner(self, engine: int) -> int:
        """Global rank that launches `engine` and drives its memory and weight-update sessions."""
        return engine * self.tp if self.mode == "colocated" else 0

    def engine_gpu(self, engine: int) -> int:
        """The engine's first GPU on its node (SGLang's base_gpu_id)."""
        if self.mode == "colocated":
            return self.owner(engine) % self.ranks_per_node
        return self.base_gpu_id + engine * self.tp

    def owned_engines(self, rank: int) -> List[int]:
        return [e for e in range(self.num_engines) if self.owner(e) == rank]


def engines_for(leader: int, num_leaders: int, num_engines: int) -> List[int]:
    """Engines that data-parallel leader `leader` sends its prompts to: a contiguous share when
    there are more engines than leaders, else one engine shared round-robin."""
    if num_engines >= num_leaders:
        lo, hi = leader * num_engines // num_leaders, (leader + 1) * num_engines // num_leaders
        return list(range(lo, hi))
    return [leader % num_engines]


def split_even(n: int, parts: int) -> List[range]:
    """`parts` contiguous ranges covering range(n), sizes differing by at most one."""
    return [range(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
