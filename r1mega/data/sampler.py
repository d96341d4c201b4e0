"""Prompts for each RL step: epoch-wise shuffles, split over data-parallel ranks, resumable."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from r1mega.data.prompts import PromptRecord


class PromptSampler:
    """Step batches of prompts_per_step prompts; each data-parallel rank gets its contiguous share.

    All ranks walk one global stream, a pure function of (seed, epoch), so a resumed run sees
    exactly the prompts an uninterrupted run would, and extra draws (dynamic sampling) advance
    the same stream. Every rank must make the same calls in the same order.
    """

    def __init__(self, records: Sequence[PromptRecord], prompts_per_step: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1):
        if not records:
            raise ValueError("no prompts to sample from")
        if prompts_per_step < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need prompts_per_step >= 1 and 0 <= dp_rank < dp_size, got "
                             f"{prompts_per_step}, {dp_rank}, {dp_size}")
        if prompts_per_step % dp_size:
            raise ValueError(f"data.prompts_per_step={prompts_per_step} must be a multiple of the "
                             f"data-parallel size {dp_size}")
        self.records, self.per_step, self.seed = list(records), prompts_per_step, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def _take(self, count: int) -> List[int]:
        """The next `count` indices of the global stream, moving into new epochs as needed."""
        out: List[int] = []
        while len(out) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            take = min(count - len(out), len(self._order) - self.position)
            out += self._order[self.position:self.position + take].tolist()
            self.position += take
        return out

    def _mine(self, indices: List[int]) -> List[PromptRecord]:
        share = len(indices) // self.dp_size
        return [self.records[i] for i in indices[self.dp_rank * share:(self.dp_rank + 1) * share]]

    def next_batch(self) -> List[PromptRecord]:
        """This rank's prompts of the next step (prompts_per_step / dp_size of them)."""
        return self._mine(self._take(self.per_step))

    def more(self, k: int) -> List[PromptRecord]:
        """k more prompts for this rank (k * dp_size from the global stream; same k on every rank)."""
        if k < 0:
            raise ValueError(f"more(k) needs k >= 0, got {k}")
        return self._mine(self._take(k * self.dp_size))

    def take(self, k: int) -> List[int]:
        """The next k indices into `records` of the global stream (all ranks' shares; asynchronous
        rollouts hand them out from one rank)."""
        return self._take(k)

    def state_dict(self) -> Dict[str, int]:
        """Where the stream stands; seed and size let a resume check it is the same stream."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.records)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a state_dict(); refuses one made over other prompts or another seed."""
        size, seed = state.get("size", len(self.records)), state.get("seed", self.seed)
        if size != len(self.records) or seed != self.seed:
            raise ValueError(f"prompt sampler: checkpoint was made over {size} prompts with seed {seed}, "
                             f"this run has {len(self.records)} with seed {self.seed}")
        if not 0 <= int(state["position"]) <= len(self.records):
            raise ValueError(f"prompt sampler: position {state['position']} outside 0..{len(self.records)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle(self.epoch)
