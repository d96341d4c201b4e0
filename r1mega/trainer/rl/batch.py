"""Rollouts as training tensors: THD packs (or right-padded rows), micro-batched by tokens.

A row is prompt + response. The model reads tokens[:-1] and predicts tokens[1:]; the
response tokens are predicted at positions prompt_len - 1 ... len - 2.

Packed (trainer.pack, the default): rows lie back to back in one sequence, with megatron's
packed-sequence parameters keeping attention and rotary positions inside each row, so no
position is spent on padding. Logits are computed at the response positions only
(`logits_at`), and the loss reads them in the per-row layout [b, R] (R: the longest
response), where the mask marks each row's first R_i columns.

Context parallelism (parallel.cp > 1, packs only): each row is padded to a multiple of 2 x cp and
every rank holds its two chunks of each (r1mega.models.context_parallel), so the positions whose
logits this rank computes are some of each response's. The per-row layout and the mask stay whole:
`per_row` sums the ranks' parts, so every context-parallel rank computes the loss of whole rows.

Padded (trainer.pack=false): rows right-padded to the longest; under causal attention no real
token sees a pad, so no attention mask is needed. Logits are computed from the earliest
response position of the micro-batch on (`logits_from`), and per-token fields cover positions
logits_from ... L - 1.

Either way the padding positions are marked (`pad`, megatron's MoE padding mask): routers leave them
out of their load-balancing losses, which then do not depend on the layout.

With MoE routing replay a row also has the experts of each of its input positions in every MoE layer
([len_i - 1, M, k]); a micro-batch lays them out like its tokens (`routing`, [b, L, M, k]), padding
positions taking experts 0..k-1, which no loss reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from r1mega.config.schema import R1Config
from r1mega.data.balance import balanced_parts, token_bins
from r1mega.data.packing import split_rows, thd_params
from r1mega.models.context_parallel import local_positions
from r1mega.models.routing_replay import unrouted
from r1mega.platform.distributed import dp_all_gather, dp_max
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
    teacher_logp: Optional[List[torch.Tensor]] = None  # the distillation teacher's (algorithm.opd)
    # its k most likely tokens at each response position ([R_i, k + 1] log-probs, the rest's mass last, and
    # [R_i, k] ids; algorithm.opd.top_k)
    teacher_topk_logp: Optional[List[torch.Tensor]] = None
    teacher_topk_ids: Optional[List[torch.Tensor]] = None
    # experts each input position is routed to in every MoE layer, [len_i - 1, M, k], for replay
    routing: Optional[List[torch.Tensor]] = None

    @staticmethod
    def from_rollouts(rollouts: Rollouts, advantages: torch.Tensor) -> "StepBatch":
        tokens = [torch.tensor(p + r, dtype=torch.long) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
        return StepBatch(tokens, [len(p) for p in rollouts.prompt_ids], advantages.float(),
                         [torch.tensor(lp, dtype=torch.float32) for lp in rollouts.logprobs],
                         routing=list(rollouts.routing) if rollouts.routing else None)

    def __len__(self) -> int:
        return len(self.tokens)

    def response_tokens(self, rows: Sequence[int]) -> int:
        return sum(len(self.tokens[i]) - self.prompt_lens[i] for i in rows)

    def select(self, rows: Sequence[int]) -> "StepBatch":
        """The rollouts' fields of `rows` (before the log-prob passes fill the others)."""
        rows = list(rows)
        return StepBatch([self.tokens[i] for i in rows], [self.prompt_lens[i] for i in rows], self.advantages[rows],
                         [self.rollout_logp[i] for i in rows],
                         routing=[self.routing[i] for i in rows] if self.routing is not None else None)

    def model_lengths(self) -> List[int]:
        """Positions each row takes in a forward (its tokens but the last)."""
        return [len(t) - 1 for t in self.tokens]


def balance_over_dp(batch: StepBatch) -> StepBatch:
    """The rows of all data-parallel ranks, re-dealt so that each rank's share of tokens is as equal
    as possible (a balanced partition of every row's length; rank r takes part r).

    Before the log-prob passes: only the rollouts' fields travel. Rows of a group may land on
    different ranks; their advantages are already computed, and every loss denominator is a sum
    over all ranks, so the optimizer step does not depend on who holds which row.
    """
    mine = (batch.tokens, batch.prompt_lens, batch.advantages, batch.rollout_logp, batch.routing)
    everyone = dp_all_gather(mine)
    if len(everyone) == 1:
        return batch
    whole = StepBatch([t for r in everyone for t in r[0]], [n for r in everyone for n in r[1]],
                      torch.cat([r[2] for r in everyone]), [lp for r in everyone for lp in r[3]],
                      routing=[x for r in everyone for x in r[4]] if batch.routing is not None else None)
    parts = balanced_parts(whole.model_lengths(), len(everyone))
    if any(not p for p in parts):  # fewer rows than ranks: every rank keeps its own
        return batch
    return whole.select(parts[ps.get_data_parallel_rank()])


@dataclass
class MicroBatch:
    """The tensors of some rows. Per-token fields (mask, log-probs) are [b, W] in the loss's layout:
    aligned with the model's output positions logits_from ... L - 1 for padded rows, each row's
    response from column 0 for a pack. `targets` is aligned with the model's output: [b, W]
    padded, [1, K] for a pack (K response positions, `logits_at`)."""

    rows: List[int]
    tokens: torch.Tensor  # [b, L] model input ([1, T] for a pack)
    targets: torch.Tensor  # next tokens at the positions whose logits are computed
    mask: torch.Tensor  # [b, W] bool, True where the target is a response token
    advantages: torch.Tensor  # [b]
    rollout_logp: torch.Tensor  # [b, W]
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    logits_from: int = 0  # padded rows: first position whose logits a loss reads
    # a THD pack: row boundaries, restarting positions, the response positions whose logits are
    # computed, and where each of them lands in the [b, W] layout (row, column)
    cu_seqlens: Optional[torch.Tensor] = None  # [b + 1] int32 (+ 1 with a padding segment)
    max_seqlen: int = 0
    # context parallelism: cu_seqlens are the rows' padded bounds in the whole pack, these their real
    # tokens; this rank holds 1 / cp_size of the pack's positions
    cu_seqlens_unpadded: Optional[torch.Tensor] = None
    cp_size: int = 1
    positions: Optional[torch.Tensor] = None  # [1, T]
    pad: Optional[torch.Tensor] = None  # like tokens, bool: True at padding (no row's token)
    logits_at: Optional[torch.Tensor] = None  # [K]
    row_of: Optional[torch.Tensor] = None  # [K]
    col_of: Optional[torch.Tensor] = None  # [K]
    routing: Optional[torch.Tensor] = None  # like tokens, [b, L, M, k]: experts to replay
    row_index: Optional[torch.Tensor] = None  # a pack's, like tokens: the row of each position, -1 at padding
    teacher_logp: Optional[torch.Tensor] = None  # [b, W] the distillation teacher's log-probs (algorithm.opd)
    teacher_topk_logp: Optional[torch.Tensor] = None  # [b, W, k + 1] its k most likely tokens' log-probs, the rest
    teacher_topk_ids: Optional[torch.Tensor] = None  # [b, W, k] and their ids

    def input_spans(self) -> List[Tuple[int, int, int]]:
        """(b index, first position, positions) of each row's input tokens in `tokens` (whole packs)."""
        lengths = (~self.pad).sum(dim=1).tolist() if self.cu_seqlens is None else None
        if lengths is not None:
            return [(j, 0, n) for j, n in enumerate(lengths)]
        real = (~self.pad[0]).long()
        return [(0, int(a), int(real[a:b].sum())) for a, b in zip(self.cu_seqlens[:len(self.rows)].tolist(),
                                                                    self.cu_seqlens[1:len(self.rows) + 1].tolist())]

    @property
    def logits_window(self) -> Union[int, torch.Tensor]:
        """What the output layer projects (models.logits_window): a first position, or positions."""
        return self.logits_at if self.logits_at is not None else self.logits_from

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of GPTModel.forward (right padding needs no attention mask)."""
        positions = self.positions
        if positions is None:
            positions = torch.arange(self.tokens.size(1), device=self.tokens.device).expand_as(self.tokens)
        if self.cu_seqlens_unpadded is not None:
            params = thd_params(self.cu_seqlens_unpadded, self.max_seqlen, self.cu_seqlens)
        else:
            params = thd_params(self.cu_seqlens, self.max_seqlen)
        return {"input_ids": self.tokens, "position_ids": positions, "attention_mask": None,
                "packed_seq_params": params, "padding_mask": self.pad}

    def targets_by_position(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(next token, whether a loss reads it) at every input position, [b, L] like tokens: the
        response tokens' predictions (targets elsewhere are unknown here and left 0)."""
        targets, mask = torch.zeros_like(self.tokens), torch.zeros_like(self.tokens, dtype=torch.bool)
        if self.logits_at is None:
            targets[:, self.logits_from:], mask[:, self.logits_from:] = self.targets, self.mask
        else:
            targets[0, self.logits_at], mask[0, self.logits_at] = self.targets[0], self.mask[self.row_of, self.col_of]
        return targets, mask

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values aligned with `targets` in the [b, W] layout of the mask (differentiable).
        Under context parallelism the ranks' parts are summed (all-reduce forward, identity backward:
        each rank's values reach every rank's loss, and each rank's gradient is its own part's)."""
        if self.logits_at is None:
            return values
        extra = values.shape[2:]  # values of several tokens per position ([1, K, k]) keep their last dim
        out = values.new_zeros(self.mask.shape + extra).index_put((self.row_of, self.col_of),
                                                                  values.reshape(-1, *extra))
        if self.cp_size > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=ps.get_context_parallel_group())
        return out

    def in_output_layout(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values in the [b, W, ...] layout of the mask, laid out like `targets` (the model's output
        positions; this rank's part under context parallelism): per_row's inverse."""
        return values if self.logits_at is None else values[self.row_of, self.col_of].unsqueeze(0)

    def to(self, device) -> "MicroBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in moved.items()
                                if isinstance(v, torch.Tensor)})


def _per_token_fields(batch: StepBatch) -> Dict[str, List[torch.Tensor]]:
    fields_ = {"rollout_logp": batch.rollout_logp, "old_logp": batch.old_logp, "ref_logp": batch.ref_logp,
               "teacher_logp": batch.teacher_logp, "teacher_topk_logp": batch.teacher_topk_logp,
               "teacher_topk_ids": batch.teacher_topk_ids}
    return {k: v for k, v in fields_.items() if v is not None}


def _blank(values: List[torch.Tensor], rows: int, width: int) -> torch.Tensor:
    """Zeros [rows, width, ...] for a per-token field: its values' trailing dims and dtype."""
    first = values[0]
    return torch.zeros(rows, width, *first.shape[1:], dtype=first.dtype)


def _padded_routing(batch: StepBatch, i: int, width: int) -> torch.Tensor:
    """Row i's routing [width, M, k]: its input positions', then padding's (experts 0..k-1)."""
    routing, n = batch.routing[i], len(batch.tokens[i]) - 1
    if routing.shape[0] != n:
        raise ValueError(f"row {i}: routing for {routing.shape[0]} positions, the row has {n}")
    return torch.cat([routing, unrouted(width - n, *routing.shape[1:])])


def collate(batch: StepBatch, rows: List[int], multiple: int = 1) -> MicroBatch:
    """Right-padded tensors of `rows`; the length is rounded up to `multiple` (sequence parallelism)."""
    width = max(len(batch.tokens[i]) for i in rows) - 1
    width = -(-width // multiple) * multiple
    b = len(rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    targets = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    pad = torch.ones(b, width, dtype=torch.bool)
    per_token = _per_token_fields(batch)
    padded = {k: _blank(v, b, width) for k, v in per_token.items()}
    for j, i in enumerate(rows):
        seq, start = batch.tokens[i], batch.prompt_lens[i] - 1
        n = len(seq) - 1
        tokens[j, :n], targets[j, :n] = seq[:-1], seq[1:]
        pad[j, :n] = False
        mask[j, start:n] = True
        for key, values in per_token.items():
            padded[key][j, start:n] = values[i]
    start = min(min(batch.prompt_lens[i] for i in rows) - 1, width - 1)
    window = {k: v[:, start:] for k, v in padded.items()}
    return MicroBatch(rows, tokens, targets[:, start:], mask[:, start:], batch.advantages[rows],
                      window["rollout_logp"], window.get("old_logp"), window.get("ref_logp"), start, pad=pad,
                      routing=torch.stack([_padded_routing(batch, i, width) for i in rows])
                      if batch.routing is not None else None, teacher_logp=window.get("teacher_logp"),
                      teacher_topk_logp=window.get("teacher_topk_logp"),
                      teacher_topk_ids=window.get("teacher_topk_ids"))


def pack(batch: StepBatch, rows: List[int], multiple: int = 1, cp_size: int = 1, cp_rank: int = 0) -> MicroBatch:
    """A THD pack of `rows`, its length rounded up to `multiple` (sequence parallelism, FP8) with a
    padding segment of its own that no loss reads. With cp_size > 1: every row padded to a multiple
    of 2 x cp_size, each rank's part of the pack a multiple of `multiple`, and rank cp_rank's chunks."""
    responses = [len(batch.tokens[i]) - batch.prompt_lens[i] for i in rows]
    width = max(responses)
    per_token = _per_token_fields(batch)
    layout = {k: _blank(v, len(rows), width) for k, v in per_token.items()}
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    tokens, positions, targets, logits_at, row_of, cu, real = [], [], [], [], [], [0], [0]
    pads, row_index = [], []
    row_multiple = 2 * cp_size if cp_size > 1 else 1
    for j, (i, r) in enumerate(zip(rows, responses)):
        seq, start, n = batch.tokens[i], cu[-1], len(batch.tokens[i]) - 1
        span = n + (-n % row_multiple)
        tokens += [seq[:-1], torch.zeros(span - n, dtype=torch.long)]
        pads += [torch.zeros(n, dtype=torch.bool), torch.ones(span - n, dtype=torch.bool)]
        row_index += [torch.full((n,), j), torch.full((span - n,), -1)]
        positions.append(torch.arange(span))
        targets.append(seq[n + 1 - r:])  # the response (seq[-r:] would be all of it when r = 0)
        logits_at.append(torch.arange(start + n - r, start + n))
        row_of.append(torch.full((r,), j))
        mask[j, :r] = True
        for key, values in per_token.items():
            layout[key][j, :r] = values[i]
        cu.append(start + span)
        real.append(real[-1] + n)
    whole = math.lcm(row_multiple, cp_size * multiple)
    pad = -cu[-1] % whole
    if pad:
        tokens.append(torch.zeros(pad, dtype=torch.long))
        pads.append(torch.ones(pad, dtype=torch.bool))
        row_index.append(torch.full((pad,), -1))
        positions.append(torch.arange(pad))
        cu.append(cu[-1] + pad)
        real.append(real[-1] + pad)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    routing = None
    if batch.routing is not None:  # each row's span, then the padding segment's
        parts = [_padded_routing(batch, i, span) for i, span in zip(rows, lengths)]
        if pad:
            parts.append(unrouted(pad, *parts[0].shape[1:]))
        routing = torch.cat(parts).unsqueeze(0)
    micro = MicroBatch(
        rows, torch.cat(tokens).unsqueeze(0), torch.cat(targets).unsqueeze(0), mask, batch.advantages[rows],
        layout["rollout_logp"], layout.get("old_logp"), layout.get("ref_logp"),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(lengths),
        positions=torch.cat(positions).unsqueeze(0), pad=torch.cat(pads).unsqueeze(0),
        logits_at=torch.cat(logits_at), row_of=torch.cat(row_of),
        col_of=torch.cat([torch.arange(r) for r in responses]), routing=routing,
        row_index=torch.cat(row_index).unsqueeze(0), teacher_logp=layout.get("teacher_logp"),
        teacher_topk_logp=layout.get("teacher_topk_logp"), teacher_topk_ids=layout.get("teacher_topk_ids"))
    return _cp_part(micro, torch.tensor(real, dtype=torch.int32), cp_size, cp_rank) if cp_size > 1 else micro


def _cp_part(micro: MicroBatch, cu_real: torch.Tensor, size: int, rank: int) -> MicroBatch:
    """Rank `rank`'s chunks of a whole pack: its positions, and the response positions among them."""
    held = local_positions(micro.cu_seqlens, rank, size)
    local = torch.full((micro.tokens.size(1),), -1, dtype=torch.long)
    local[held] = torch.arange(held.numel())
    at = local[micro.logits_at]
    kept = at >= 0
    return replace(micro, tokens=micro.tokens[:, held], positions=micro.positions[:, held],
                   pad=micro.pad[:, held], routing=micro.routing[:, held] if micro.routing is not None else None,
                   row_index=micro.row_index[:, held],
                   targets=micro.targets[:, kept], logits_at=at[kept], row_of=micro.row_of[kept],
                   col_of=micro.col_of[kept], cu_seqlens_unpadded=cu_real, cp_size=size)


def response_values(micro: MicroBatch, values: torch.Tensor) -> List[torch.Tensor]:
    """Per-row response slices of per-token values aligned with `targets` (the inverse of the
    placement by collate or pack)."""
    return row_slices(micro, micro.per_row(values))


def row_slices(micro: MicroBatch, per_row: torch.Tensor) -> List[torch.Tensor]:
    """Per-row response slices of values in the [b, W] layout of the mask."""
    return [per_row[j][micro.mask[j]].detach().float().cpu() for j in range(len(micro.rows))]


def micro_batches(cfg: R1Config, batch: StepBatch, rows: List[int]) -> List[MicroBatch]:
    """Micro-batches of `rows` under trainer.micro_batch_tokens; as many on every data-parallel rank
    (ranks run the pipeline schedule and the gradient reduction in lock-step). Packs are balanced
    in tokens; padded rows are grouped longest first, each group costing rows x its longest."""
    lengths = batch.model_lengths()
    cp = ps.get_context_parallel_world_size()
    budget = cfg.trainer.micro_batch_tokens * cp  # a pack is split over the context-parallel ranks
    multiple = sequence_multiple(cfg.model.fp8, cfg.parallel)  # sequence parallelism, FP8 shapes

    def parts(min_parts: int) -> List[List[int]]:
        if cfg.trainer.pack:
            return [[rows[k] for k in part] for part in token_bins([lengths[i] for i in rows], budget, min_parts)]
        return split_rows(lengths, rows, budget, min_parts=min_parts)

    groups = parts(1)
    count = int(dp_max([len(groups)])[0])
    if count != len(groups):
        groups = parts(count)
    if not cfg.trainer.pack:
        return [collate(batch, g, multiple) for g in groups]
    return [pack(batch, g, multiple, cp, ps.get_context_parallel_rank()) for g in groups]


def layout_stats(batch: StepBatch, micro: Sequence[MicroBatch]) -> Dict[str, float]:
    """This rank's model positions (its context-parallel group's), the real tokens among them (the
    rest is padding), and the fewest and most real tokens of one micro-batch."""
    lengths = batch.model_lengths()
    real = [sum(lengths[i] for i in m.rows) for m in micro]
    return {"positions": float(sum(m.tokens.numel() * m.cp_size for m in micro)), "real": float(sum(real)),
            "min": float(min(real, default=0)), "max": float(max(real, default=0))}
