"""SFT micro-batches: THD packs keep samples whole and apart; padded rows hold the same targets."""

import random

import torch

from r1mega.data.conversations import SFTSample
from r1mega.data.packing import pack, pad_rows


def samples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        tokens = [rng.randrange(1, 100) for _ in range(n)]
        start = rng.randrange(1, n)
        out.append(SFTSample(tokens, [False] * start + [True] * (n - start)))
    return out


def targets_of(micro):
    """(target, masked) pairs of each sample, recovered from a micro-batch."""
    out = []
    if micro.cu_seqlens is not None:
        cu = micro.cu_seqlens.tolist()
        for a, b in zip(cu, cu[1:]):
            out.append((micro.targets[0, a:b].tolist(), micro.mask[0, a:b].tolist()))
    else:
        for j in range(micro.tokens.size(0)):
            out.append((micro.targets[j].tolist(), micro.mask[j].tolist()))
    return out


def test_pack_holds_every_sample_whole_with_restarting_positions():
    data = samples([7, 12, 3, 20, 9, 5])
    parts = pack(data, budget=24)
    seen = []
    for micro in parts:
        assert micro.tokens.size(0) == 1 and micro.tokens.size(1) <= 24
        cu = micro.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == micro.tokens.size(1)
        assert micro.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
        for a, b in zip(cu, cu[1:]):
            assert micro.positions[0, a:b].tolist() == list(range(b - a))
            seen.append((micro.tokens[0, a:b].tolist(), micro.targets[0, a:b].tolist(),
                         micro.mask[0, a:b].tolist()))
    expected = [(s.tokens[:-1], s.tokens[1:], s.assistant[1:]) for s in data]
    assert sorted(seen) == sorted(expected)


def test_oversized_sample_gets_its_own_pack_and_min_parts_splits():
    data = samples([40, 5, 5, 5])
    parts = pack(data, budget=16)
    assert sorted(len(p.cu_seqlens) - 1 for p in parts) == [1, 3]
    assert len(pack(data, budget=16, min_parts=4)) == 4
    assert len(pad_rows(data, budget=16, min_parts=4)) == 4


def test_pack_pads_to_a_multiple_with_a_lossless_segment():
    data = samples([6, 5])  # 5 + 4 model inputs: 3 padding tokens make 12
    (micro,) = pack(data, budget=64, multiple=4)
    assert micro.tokens.size(1) == 12 and micro.cu_seqlens.tolist() == [0, 5, 9, 12]
    assert not micro.mask[0, 9:].any() and micro.positions[0, 9:].tolist() == [0, 1, 2]
    assert micro.pad[0].tolist() == [False] * 9 + [True] * 3  # the MoE padding mask


def test_padded_rows_carry_the_same_targets_as_the_pack():
    data = samples([9, 14, 6, 11], seed=3)
    packed = [t for m in pack(data, budget=1000) for t in targets_of(m)]
    padded = []
    for m in pad_rows(data, budget=1000):
        for target, mask in targets_of(m):
            padded.append(tuple(t for t, k in zip(target, mask) if k))
    assert sorted(tuple(t for t, k in zip(target, mask) if k) for target, mask in packed) == sorted(padded)
    assert sum(int(m.mask.sum()) for m in pad_rows(data, budget=30)) == sum(s.target_tokens for s in data)
    assert torch.equal(pad_rows(data, budget=1000)[0].positions[0], torch.arange(13))
    for m in pad_rows(data, budget=1000):  # padding: each row's tail past its sample
        lengths = (~m.pad).sum(1).tolist()
        assert sorted(lengths) == sorted(len(s) - 1 for s in data)
        assert all(not m.pad[j, :n].any() and m.pad[j, n:].all() for j, n in enumerate(lengths))
