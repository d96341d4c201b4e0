"""What the native engine's MoE routers chose for every token it fed them, per row, for routing replay
(algorithm.routing_replay=rollout).

A row's routing covers its input positions, the prompt and every response token but the last (which
is sampled, never fed): [len - 1, M, k], as the trainer's forward reads them. Prompts are prefilled
once and their routing shared by their n rows; a decode step adds one position to every row still
running. Only this rank's MoE layers are recorded (a pipeline stage trains only its own); the others
hold experts 0..k-1, which nothing reads.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from r1mega.models.routing_replay import unrouted


class RoutingRecord:
    """The routing of one decoding batch: prompts in the engine's (sorted) order, rows = prompt x n."""

    def __init__(self, num_prompts: int, moe_layers: int, topk: int):
        self.moe_layers, self.topk = moe_layers, topk
        self.prompts: List[torch.Tensor] = [torch.empty(0)] * num_prompts
        self.responses: List[List[torch.Tensor]] = []

    def prefill(self, first: int, lengths: List[int], recorded: Dict[int, torch.Tensor]) -> None:
        """Prompts first, first + 1, ... right-aligned in a bucket forward: recorded[layer] = [rows, width, k]
        (int16 on the host, as routing_replay.recording gives them)."""
        for i, n in enumerate(lengths):
            out = unrouted(n, self.moe_layers, self.topk)
            for layer, experts in recorded.items():
                out[:, layer] = experts[i, experts.shape[1] - n:]
            self.prompts[first + i] = out

    def start_rows(self, n: int) -> None:
        """Each prompt's n rows begin with its routing."""
        self.responses = [[] for _ in range(len(self.prompts) * n)]
        self._n = n

    def decode(self, rows: List[int], fed: List[bool], recorded: Dict[int, torch.Tensor]) -> None:
        """One token fed to each cache row (original row numbers `rows`); kept where `fed` (a row still
        running; finished rows' tokens are filler). recorded[layer] = [rows, 1, k]."""
        step = unrouted(len(rows), self.moe_layers, self.topk)
        for layer, experts in recorded.items():
            step[:, layer] = experts[:, 0]
        for j, (row, keep) in enumerate(zip(rows, fed)):
            if keep:
                self.responses[row].append(step[j])

    def row(self, row: int) -> torch.Tensor:
        parts = [self.prompts[row // self._n]]
        if self.responses[row]:
            parts.append(torch.stack(self.responses[row]))
        return torch.cat(parts)
