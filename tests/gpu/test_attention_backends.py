"""CUDA attention backends against the SDPA reference (bf16 inputs: relative error between 1e-3 and 1e-2)."""

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from r1mega.platform import installed

pytestmark = pytest.mark.gpu
needs_flash = pytest.mark.skipif(not installed.flash_attn(), reason="flash-attn is not usable here (absent, or does not "
                                                                  "import)")


def _init(cls):
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.config = SimpleNamespace(context_parallel_size=1)
    module.num_heads, module.num_groups = 8, 2
    module.attn_mask_type, module.softmax_scale, module.dropout_p = AttnMaskType.causal, 1 / math.sqrt(64), 0.0
    return module


@needs_flash
@pytest.mark.parametrize("sq,sk", [(128, 128), (1, 77), (3, 40)])
def test_flash_matches_sdpa(sq, sk):
    from r1mega.models.attention import SDPAttention
    from r1mega.models.flash_attention import FlashAttention

    gen = torch.Generator(device="cuda").manual_seed(sq * 1000 + sk)
    q = torch.randn(sq, 2, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(sk, 2, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(sk, 2, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = _init(SDPAttention)(q.float(), k.float(), v.float(), None)
    out = _init(FlashAttention)(q, k, v, None)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all() and rel < 1e-2, rel


@needs_flash
def test_flash_packed_matches_sdpa():
    from r1mega.models.attention import SDPAttention
    from r1mega.models.flash_attention import FlashAttention

    lengths = [33, 7, 64]
    total = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(total, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(total, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).int()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=64, max_seqlen_kv=64)
    ref = _init(SDPAttention)(q.float(), k.float(), v.float(), None, packed_seq_params=params)
    out = _init(FlashAttention)(q, k, v, None, packed_seq_params=params)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
