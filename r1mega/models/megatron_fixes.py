"""Where megatron-core (0.16 to 0.19) fails r1mega's models on every machine, and the measure for each.

Applied by build_model before any layer is made; each measure names the upstream code it covers and
is idempotent. (What only a machine without CUDA needs is in r1mega/platform/cpu_compat.py.)
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.platform import installed


def apply(config: TransformerConfig) -> None:
    if getattr(config, "multi_latent_attention", False) and not installed.transformer_engine():
        _mla_without_te()
    if config.moe_router_enable_expert_bias:
        _expert_bias_counts_with_padding_mask()


class _NoTELinear:
    """Stands for TELinear where Transformer Engine is absent: nothing is one."""


def _mla_without_te() -> None:
    """transformer/multi_latent_attention.py without Transformer Engine:

    - MLASelfAttention.__init__ asks `isinstance(self.linear_proj, TELinear)` whenever
      megatron.core.extensions.transformer_engine imports, which it does without TE too (0.16),
      binding TELinear to a MagicMock stub that isinstance refuses. A class in its place answers
      False there, and the down-projection checks (`in [TELinear]`) stay False.
    - The module imports modelopt's `Linear` (the duplicated down-projection r1mega's local spec
      gives MLA, r1mega/models/specs.py) only along with TE from 0.19 on, leaving it None, so its
      check `in [Linear, TEColumnParallelLinear, ColumnParallelLinear]` would refuse it."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.TELinear = _NoTELinear
    if getattr(multi_latent_attention, "Linear", None) is None:
        multi_latent_attention.Linear = Linear


def _expert_bias_counts_with_padding_mask() -> None:
    """transformer/moe/router.py TopKRouter._apply_expert_bias counts each expert's tokens for the
    expert bias with `routing_map & (~padding_mask)`: a [tokens, experts] map against the flat
    [tokens] mask the router made, which fails to broadcast (or, with as many tokens as experts,
    masks experts). Give it the mask as a column, so padding neither counts for the bias nor, the
    mask kept, enters the load-balancing loss."""
    from megatron.core.transformer.moe.router import TopKRouter

    upstream = TopKRouter._apply_expert_bias
    if getattr(upstream, "_r1mega_fix", False):
        return

    @functools.wraps(upstream)
    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == routing_map.dim() - 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return upstream(self, routing_map, padding_mask=padding_mask)

    _apply_expert_bias._r1mega_fix = True
    TopKRouter._apply_expert_bias = _apply_expert_bias
