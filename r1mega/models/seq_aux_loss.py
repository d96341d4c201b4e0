"""DeepSeek's sequence-wise load-balancing loss over the rows of a THD pack.

DeepSeek-V2/V3 balance each sequence: for a sequence of T tokens, E experts and top-k,
    L = alpha * sum_i f_i * P_i,  f_i = E / (k T) * (tokens routed to i),  P_i = 1/T * sum_t s'_{i,t}
(s' the normalised routing scores), averaged over the batch's sequences. megatron-core's
`seq_aux_loss` (TopKRouter._apply_seq_aux_loss) takes the sequences from the [s, b] layout of the
router's input: in a THD pack (b = 1) that is the whole pack, one "sequence" of every row, so the
loss balances the pack rather than each row. While `rows_of` holds the pack's row of every token,
the router computes the loss per row instead, as above; padded micro-batches keep megatron's.

Under sequence or context parallelism a rank routes only some of a row's tokens: the per-row
counts and lengths are summed over the tensor- and context-parallel group (as megatron sums its
counts), and each rank's loss is its tokens' part of the scores' sum, so the parts add up.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

# (row of every token in the router's order [tokens] (-1: padding), number of rows) while a pack runs
_ROWS: Optional[Tuple[torch.Tensor, int]] = None


@contextmanager
def rows_of(row_ids: torch.Tensor, num_rows: int) -> Iterator[None]:
    global _ROWS
    _ROWS = (row_ids, num_rows)
    try:
        yield
    finally:
        _ROWS = None


def per_row_loss(scores: torch.Tensor, routing_map: torch.Tensor, rows: torch.Tensor, num_rows: int, topk: int,
                 coeff: float, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """(this rank's part of the mean per-row loss, its real tokens). scores, routing_map: [tokens, E]."""
    valid = rows >= 0
    index = rows.clamp(min=0)
    experts = scores.shape[1]
    counts = torch.zeros(num_rows, experts, dtype=torch.float32, device=scores.device)
    counts.index_add_(0, index[valid], routing_map[valid].float())
    lengths = torch.zeros(num_rows, dtype=torch.float32, device=scores.device)
    lengths.index_add_(0, index[valid], torch.ones_like(index[valid], dtype=torch.float32))
    if group is not None and group.size() > 1:
        counts = reduce_from_tensor_model_parallel_region(counts, group)
        lengths = reduce_from_tensor_model_parallel_region(lengths, group)
    weight = counts * experts / (topk * lengths.clamp(min=1).unsqueeze(1) ** 2)  # [rows, E]
    per_token = (scores.float() * weight[index]).sum(dim=1) * valid
    return coeff * per_token.sum() / num_rows, valid.sum()


def apply() -> None:
    """TopKRouter._apply_seq_aux_loss computes per row while rows_of() is active."""
    from megatron.core.transformer.moe.router import TopKRouter

    upstream = TopKRouter._apply_seq_aux_loss
    if getattr(upstream, "_r1mega_fix", False):
        return

    @functools.wraps(upstream)
    def _apply_seq_aux_loss(self, probs, scores_for_aux_loss, routing_map, seq_length, bsz, with_padding_mask=False):
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if _ROWS is None or coeff == 0:
            return upstream(self, probs, scores_for_aux_loss, routing_map, seq_length, bsz,
                            with_padding_mask=with_padding_mask)
        rows, num_rows = _ROWS
        if rows.numel() != routing_map.shape[0]:
            raise ValueError(f"sequence aux loss: {rows.numel()} row ids for {routing_map.shape[0]} routed tokens")
        aux_loss, local_tokens = per_row_loss(scores_for_aux_loss, routing_map, rows.to(routing_map.device),
                                              num_rows, self.topk, coeff, self.tp_cp_group)
        return self.attach_and_log_load_balancing_loss(probs, coeff, aux_loss, "seq_load_balancing_loss",
                                                       self.tp_cp_group, valid_token_count=local_tokens)

    _apply_seq_aux_loss._r1mega_fix = True
    TopKRouter._apply_seq_aux_loss = _apply_seq_aux_loss
