"""The two-chunk context-parallel layout of a THD pack against megatron's own: the positions
`_get_thd_freqs_on_this_cp_rank` gives each rank's part of a sequence (the rotary positions
megatron applies to it), and the bounds the trainer's pack lays out."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

from r1mega.models.context_parallel import chunk_spans, local_positions


@pytest.mark.parametrize("size", [2, 3, 4])
def test_local_positions_are_megatrons_rotary_positions(size):
    lengths = [4 * size, 2 * size, 10 * size]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    held = [local_positions(cu, r, size) for r in range(size)]
    for rank in range(size):
        want = []
        for start, n in zip(cu.tolist(), lengths):
            local = torch.empty(n // size)  # this rank's part of the sequence
            want.append(start + _get_thd_freqs_on_this_cp_rank(rank, size, local, torch.arange(n)))
        assert torch.equal(held[rank], torch.cat(want))
    assert torch.equal(torch.cat(held).sort().values, torch.arange(int(cu[-1])))  # each position once


def test_chunk_spans_name_each_chunks_sequence_and_refuse_unpadded_rows():
    cu = torch.tensor([0, 8, 12])
    assert chunk_spans(cu, 1, 2) == [(0, 2, 2), (0, 4, 2), (8, 9, 1), (8, 10, 1)]
    with pytest.raises(ValueError, match="multiple of 2 x cp = 4; one spans 6 tokens"):
        chunk_spans(torch.tensor([0, 8, 14]), 0, 2)


def test_pack_pads_rows_for_context_parallelism_and_keeps_whole_rows_in_its_layout():
    from r1mega.rollout.types import Rollouts
    from r1mega.trainer.rl.batch import StepBatch, pack

    rollouts = Rollouts([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]], [[-0.1, -0.2], [-0.3, -0.4, -0.5, -0.6]],
                        ["stop", "stop"], [0, 0])
    batch = StepBatch.from_rollouts(rollouts, torch.tensor([1.0, -1.0]))
    parts = [pack(batch, [0, 1], multiple=4, cp_size=2, cp_rank=r) for r in range(2)]
    whole = pack(batch, [0, 1])
    for m in parts:
        # rows of 4 and 5 positions padded to 4 and 8, then a padding segment: each part a multiple of 4
        assert m.cu_seqlens.tolist() == [0, 4, 12, 16] and m.cu_seqlens_unpadded.tolist() == [0, 4, 9, 13]
        assert m.tokens.size(1) == 8 and m.cp_size == 2 and m.max_seqlen == 8
        assert torch.equal(m.mask, whole.mask) and torch.equal(m.rollout_logp, whole.rollout_logp)
    # together the parts predict each response token once, at the same targets
    targets = sorted((int(r), int(c), int(t)) for m in parts for r, c, t in zip(m.row_of, m.col_of, m.targets[0]))
    assert targets == sorted((int(r), int(c), int(t)) for r, c, t in zip(whole.row_of, whole.col_of, whole.targets[0]))
    params = parts[0].model_inputs()["packed_seq_params"]
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 12, 16] and params.cu_seqlens_q.tolist() == [0, 4, 9, 13]
    # the MoE padding mask marks exactly the positions that hold no row's token, on each rank's part
    pad = torch.zeros(16, dtype=torch.bool)
    pad[[9, 10, 11, 12, 13, 14, 15]] = True  # row 1's padding 9..11, then the padding segment
    for r, m in enumerate(parts):
        assert torch.equal(m.pad[0], pad[local_positions(m.cu_seqlens, r, 2)])
        assert m.model_inputs()["padding_mask"] is m.pad
    assert not whole.pad.any() and whole.pad.shape == whole.tokens.shape
