"""Rollouts as training tensors: right-padded rows, micro-batched by a token budget.

A row is prompt + response. The model reads tokens[:-1] and predicts tokens[1:]; the
response tokens are predicted at positions prompt_len - 1 ... len - 2, which the mask marks.
Right padding needs no attention mask: under causal attention no real token sees a pad.
Logits are only computed from the earliest response position of a micro-batch on
(`logits_from`), so per-token fields cover positions logits_from ... L - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from r1mega.config.schema import R1Config
from r1mega.data.packing import split_rows
from r1mega.platform.distributed import dp_max
from r1mega.platform.fp8 import sequence_multiple
from r1mega.rollout.types import Rollouts


@dataclass
class StepBatch:
    """One data-parallel rank's rows for the update phase (CPU tensors)."""

    tokens: List[torch.Tensor]  # [len_i] prompt + response ids
    prompt_lens: List[int]
    advantages: torch.Tensor  # [N] one per response
    rollout_logp: List[torch.Tensor]  # [R_i] the engine's log-probs of the response tokens
    old_logp: Optional[List[torch.Tensor]] = None  # trainer's, before the update (last stage only)
    ref_logp: Optional[List[torch.Tensor]] = None  # reference model's (last stage only)
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def from_rollouts(rollouts: Rollouts, advantages: torch.Tensor) -> "StepBatch":
        tokens = [torch.tensor(p + r, dtype=torch.long) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
        return StepBatch(tokens, [len(p) for p in rollouts.prompt_ids], advantages.float(),
                         [torch.tensor(lp, dtype=torch.float32) for lp in rollouts.logprobs])

    def __len__(self) -> int:
        return len(self.tokens)

    def response_tokens(self, rows: Sequence[int]) -> int:
        return sum(len(self.tokens[i]) - self.prompt_lens[i] for i in rows)


@dataclass
class MicroBatch:
    """Padded tensors of some rows; per-token fields are [b, W] aligned with the model's output,
    the logits of positions logits_from ... L - 1 (W = L - logits_from)."""

    rows: List[int]
    tokens: torch.Tensor  # [b, L] model input
    targets: torch.Tensor  # [b, W] next tokens
    mask: torch.Tensor  # [b, W] bool, True where the target is a response token
    advantages: torch.Tensor  # [b]
    rollout_logp: torch.Tensor  # [b, W]
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    logits_from: int = 0  # first position whose logits a loss reads

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of GPTModel.forward (right padding needs no attention mask)."""
        positions = torch.arange(self.tokens.size(1), device=self.tokens.device).expand_as(self.tokens)
        return {"input_ids": self.tokens, "position_ids": positions, "attention_mask": None}

    def to(self, device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(self.rows, move(self.tokens), move(self.targets), move(self.mask), move(self.advantages),
                          move(self.rollout_logp), move(self.old_logp), move(self.ref_logp), self.logits_from)


def collate(batch: StepBatch, rows: List[int], multiple: int = 1) -> MicroBatch:
    """Right-padded tensors of `rows`; the length is rounded up to `multiple` (sequence parallelism)."""
    width = max(len(batch.tokens[i]) for i in rows) - 1
    width = -(-width // multiple) * multiple
    b = len(rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    targets = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    per_token = {"rollout_logp": batch.rollout_logp, "old_logp": batch.old_logp, "ref_logp": batch.ref_logp}
    padded = {k: torch.zeros(b, width) for k, v in per_token.items() if v is not None}
    for j, i in enumerate(rows):
        seq, start = batch.tokens[i], batch.prompt_lens[i] - 1
        n = len(seq) - 1
        tokens[j, :n], targets[j, :n] = seq[:-1], seq[1:]
        mask[j, start:n] = True
        for key, values in per_token.items():
            if values is not None:
                padded[key][j, start:n] = values[i]
    start = min(min(batch.prompt_lens[i] for i in rows) - 1, width - 1)
    window = {k: v[:, start:] for k, v in padded.items()}
    return MicroBatch(rows, tokens, targets[:, start:], mask[:, start:], batch.advantages[rows],
                      window["rollout_logp"], window.get("old_logp"), window.get("ref_logp"), start)


def response_values(micro: MicroBatch, values: torch.Tensor) -> List[torch.Tensor]:
    """Per-row response slices of a [b, L] tensor (the inverse of collate's placement)."""
    return [values[j][micro.mask[j]].detach().float().cpu() for j in range(len(micro.rows))]


def micro_batches(cfg: R1Config, batch: StepBatch, rows: List[int]) -> List[MicroBatch]:
    """Micro-batches of `rows` under trainer.micro_batch_tokens; as many on every data-parallel rank
    (ranks run the pipeline schedule and the gradient reduction in lock-step)."""
    lengths = [len(t) - 1 for t in batch.tokens]
    budget = cfg.trainer.micro_batch_tokens
    parts = split_rows(lengths, rows, budget)
    count = int(dp_max([len(parts)])[0])
    if count != len(parts):
        parts = split_rows(lengths, rows, budget, min_parts=count)
    multiple = sequence_multiple(cfg.model.fp8, cfg.parallel)  # sequence parallelism, FP8 shapes
    return [collate(batch, p, multiple) for p in parts]
