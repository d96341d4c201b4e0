"""SDPAttention against a naive float64 softmax attention, in each layout it serves."""

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from r1mega.models.attention import SDPAttention

HEADS, GROUPS, DIM = 4, 2, 8


def _module():
    config = SimpleNamespace(context_parallel_size=1, num_attention_heads=HEADS, num_query_groups=GROUPS,
                             kv_channels=DIM, attention_dropout=0.0)
    module = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(module)
    module.config = config
    module.num_heads, module.num_groups = HEADS, GROUPS
    module.attn_mask_type, module.softmax_scale, module.dropout_p = AttnMaskType.causal, 1 / math.sqrt(DIM), 0.0
    module.cp_group = None
    return module


def _naive(q, k, v, allowed):
    """q [sq, h, d], k/v [sk, g, d], allowed [sq, sk] -> [sq, h*d] in float64."""
    q, k, v = q.double(), k.double(), v.double()
    rep = HEADS // GROUPS
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def _qkv(sq, sk, b, gen):
    return (torch.randn(sq, b, HEADS, DIM, generator=gen), torch.randn(sk, b, GROUPS, DIM, generator=gen),
            torch.randn(sk, b, GROUPS, DIM, generator=gen))


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_causal_batch():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(7, 7, 3, gen)
    out = _module()(q, k, v, None)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    for b in range(3):
        assert _rel(out[:, b], _naive(q[:, b], k[:, b], v[:, b], allowed)) < 1e-6


def test_padding_mask_combines_with_causal():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(6, 6, 1, gen)
    masked = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    masked[..., :2] = True  # first two keys are padding (megatron: True = masked out)
    masked[..., 0:2, :] = False
    masked[..., 0:2, 0] = False
    out = _module()(q, k, v, masked)
    allowed = ~masked[0, 0] & torch.ones(6, 6, dtype=torch.bool).tril()
    rows = allowed.any(-1)
    assert _rel(out[rows, 0], _naive(q[:, 0], k[:, 0], v[:, 0], allowed)[rows]) < 1e-6


def test_kv_cache_queries_see_all_earlier_keys():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 9, 1, gen)  # the last 2 positions of a 9-token sequence
    out = _module()(q, k, v, None)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[-2:]
    assert _rel(out[:, 0], _naive(q[:, 0], k[:, 0], v[:, 0], allowed)) < 1e-6


@pytest.mark.parametrize("lengths", [[5, 3, 4], [1, 7]])
def test_packed_equals_each_sample_alone(lengths):
    gen = torch.Generator().manual_seed(3)
    total = sum(lengths)
    q = torch.randn(total, HEADS, DIM, generator=gen)
    k, v = torch.randn(total, GROUPS, DIM, generator=gen), torch.randn(total, GROUPS, DIM, generator=gen)
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    out = _module()(q, k, v, None, packed_seq_params=params)
    for start, n in zip(cu[:-1].tolist(), lengths):
        sl = slice(start, start + n)
        ref = _naive(q[sl], k[sl], v[sl], torch.ones(n, n, dtype=torch.bool).tril())
        assert _rel(out[sl], ref) < 1e-6


def test_spans_with_causal_offsets_see_every_earlier_key():
    # what a context-parallel rank computes: chunks of queries against all keys of their sequence up
    # to the chunk's end (bottom-right causal), in buckets of several shapes
    gen = torch.Generator().manual_seed(4)
    spans = [(0, 2, 0, 2), (2, 2, 0, 8), (4, 3, 8, 3), (7, 3, 8, 12), (10, 1, 20, 5)]  # (q0, nq, k0, nk)
    q = torch.randn(11, HEADS, DIM, generator=gen)
    k, v = torch.randn(25, GROUPS, DIM, generator=gen), torch.randn(25, GROUPS, DIM, generator=gen)
    as_bhtd = lambda x: x.unsqueeze(0).transpose(1, 2)  # noqa: E731
    out = _module()._spans(as_bhtd(q), as_bhtd(k), as_bhtd(v), spans, 0.0).transpose(1, 2)[0].reshape(11, -1)
    for q0, nq, k0, nk in spans:
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        ref = _naive(q[q0:q0 + nq], k[k0:k0 + nk], v[k0:k0 + nk], allowed)
        assert _rel(out[q0:q0 + nq], ref) < 1e-6
