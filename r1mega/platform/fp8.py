"""The shapes Transformer Engine accepts in FP8, as multiples every forward must be padded to.

Transformer Engine 2.8's FP8 linears (`Linear`, `LayerNormLinear`, `LayerNormMLP`) assert on
every input and weight that the product of all dimensions but the last is a multiple of 8 and
the last a multiple of 16 (`pytorch/utils.py: assert_dim_for_fp8_exec`). MXFP8 quantizes only
tensors whose both flattened dimensions are multiples of 32 (`MXFP8Quantizer::create_tensor`),
and under sequence parallelism the all-gathered input of a block-scaled (blockwise) recipe must
be a multiple of its 128-wide blocks (`Float8BlockQuantizer.is_quantizable`). megatron-core pads
its MoE experts' tokens to `get_fp8_align_size` (16, MXFP8 32) but not the dense layers' inputs:
r1mega pads every micro-batch, pack and decoding batch itself.
"""

from __future__ import annotations

from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_align_size

from r1mega.config.schema import FP8Config, ParallelConfig


def token_multiple(fp8: FP8Config, sequence_split: int = 1) -> int:
    """What a forward's token count ([s, b]: s x b; a THD pack: its length) must be a multiple of,
    when each rank reads 1/sequence_split of the tokens (tp under sequence parallelism, else 1)."""
    if fp8.format is None:
        return sequence_split
    align = get_fp8_align_size(Fp8Recipe(fp8.recipe))
    if fp8.recipe == "blockwise" and sequence_split > 1:
        align = 128
    return align * sequence_split


def sequence_multiple(fp8: FP8Config, parallel: ParallelConfig) -> int:
    """What a training micro-batch's padded length (a THD pack's length) must be a multiple of."""
    return token_multiple(fp8, parallel.tp if parallel.sequence_parallel else 1)


def feature_multiples(fp8: FP8Config) -> tuple[int, int]:
    """What every linear layer's (input, output) features must be multiples of."""
    return (32, 32) if fp8.recipe == "mxfp8" else (16, 8)
