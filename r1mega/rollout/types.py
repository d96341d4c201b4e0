"""The seam between trainer and generator: sampling settings, rollouts, the engine protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Protocol, Sequence, Tuple

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: Tuple[str, ...] = ()  # stop strings, checked on the decoded tail
    stop_token_ids: Tuple[int, ...] = ()  # besides the tokenizer's EOS
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature the returned log-probs (and the trainer's) are computed at."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class Rollouts:
    """n responses per prompt, grouped: rows [i*n, (i+1)*n) answer prompt i."""

    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    logprobs: List[List[float]]  # of each response token, at params.logprob_temperature
    finish_reasons: List[str]  # "stop" (EOS or a stop string/token) | "length"
    group_index: List[int]  # prompt of each row
    # policy version (trainer steps) each token was sampled under; empty: the engine's current weights
    # (asynchronous rollouts fill it; with partial rollouts a row's tokens can span versions)
    versions: List[List[int]] = field(default_factory=list)
    # MoE routing replay (algorithm.routing_replay=rollout): the experts each input position (prompt and
    # response but the last token) was routed to in every MoE layer, [len - 1, M, k] int16; empty: none
    routing: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> List[int]:
        return [len(r) for r in self.response_ids]

    def select(self, rows: Sequence[int]) -> "Rollouts":
        """The given rows, in order."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Rollouts(pick(self.prompt_ids), pick(self.response_ids), pick(self.logprobs),
                        pick(self.finish_reasons), pick(self.group_index), pick(self.versions) if self.versions else [],
                        pick(self.routing) if self.routing else [])

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """Rows of all parts; group indices are renumbered so groups stay distinct. Versions are kept
        when every part has them."""
        out = Rollouts([], [], [], [], [])
        offset = 0
        for part in parts:
            out.prompt_ids += part.prompt_ids
            out.response_ids += part.response_ids
            out.logprobs += part.logprobs
            out.finish_reasons += part.finish_reasons
            out.group_index += [g + offset for g in part.group_index]
            out.versions += part.versions
            out.routing += part.routing
            offset += max(part.group_index, default=-1) + 1
        if any(len(p.versions) != len(p) for p in parts):
            out.versions = []
        if any(len(p.routing) != len(p) for p in parts):
            out.routing = []
        return out

    def pack(self) -> dict:
        """The rows as a few flat tensors, for a checkpoint: each group's prompt once, token ids in int32,
        log-probs in float32 (as training reads them); versions are not kept."""
        flat = lambda rows, dtype: torch.tensor([x for r in rows for x in r], dtype=dtype)  # noqa: E731
        lengths = lambda rows: torch.tensor([len(r) for r in rows], dtype=torch.int64)  # noqa: E731
        first = {}
        for row, g in enumerate(self.group_index):
            first.setdefault(g, row)
        if sorted(first) != list(range(len(first))):
            raise ValueError(f"pack() needs groups numbered 0..{len(first) - 1}, got {sorted(first)}")
        prompts = [self.prompt_ids[first[g]] for g in range(len(first))]
        out = {"prompt_ids": flat(prompts, torch.int32), "prompt_lens": lengths(prompts),
               "response_ids": flat(self.response_ids, torch.int32), "response_lens": lengths(self.response_ids),
               "logprobs": flat(self.logprobs, torch.float32), "group_index": torch.tensor(self.group_index),
               "truncated": torch.tensor([r == "length" for r in self.finish_reasons])}
        if self.routing:  # rows' positions back to back
            out["routing"] = torch.cat(self.routing)
        return out

    @staticmethod
    def unpack(packed: dict) -> "Rollouts":
        """The rows of a pack()."""
        def split(values: torch.Tensor, lengths: torch.Tensor) -> list:
            return [part.tolist() for part in values.split(lengths.tolist())]

        lens, groups = packed["response_lens"], packed["group_index"].tolist()
        prompts = split(packed["prompt_ids"], packed["prompt_lens"])
        reasons = ["length" if t else "stop" for t in packed["truncated"].tolist()]
        rows = Rollouts([list(prompts[g]) for g in groups], split(packed["response_ids"], lens),
                        split(packed["logprobs"], lens), reasons, groups)
        if "routing" in packed:
            positions = [len(p) + len(r) - 1 for p, r in zip(rows.prompt_ids, rows.response_ids)]
            rows.routing = list(packed["routing"].split(positions))
        return rows


class RolloutEngine(Protocol):
    """What the RL trainer needs from a generator (native megatron or SGLang)."""

    weights_lost: bool  # a memory release threw its copy of the weights away: sync before generating

    def generate(self, prompts: List[List[int]], params: SamplingParams, n: int) -> Rollouts: ...

    def sync_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None: ...

    def release_memory(self, tags: Sequence[str] = ...) -> None: ...  # weights, kv_cache, cuda_graph

    def state_dict(self) -> dict: ...  # what a resumed run needs to sample as an uninterrupted one

    def load_state_dict(self, state: dict) -> None: ...

    def resume_memory(self, tags: Sequence[str] = ...) -> None: ...

    def shutdown(self) -> None: ...  # stop what the engine launched
