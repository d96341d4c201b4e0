"""Where megatron-core (0.16 to 0.19) fails r1mega's models on every machine, and the measure for each.

Applied by build_model before any layer is made; each measure names the upstream code it covers and
is idempotent. (What only a machine without CUDA needs is in r1mega/platform/cpu_compat.py.)
"""

from __future__ import annotations

import functools

import torch
from packaging.version import Version
from megatron.core.transformer.transformer_config import TransformerConfig

from r1mega.models import seq_aux_loss
from r1mega.models.duplicated_linear import DuplicatedLinear
from r1mega.platform import installed


def _after_0_16() -> bool:
    return Version(installed.version("megatron-core") or "0").release[:2] >= (0, 17)


def apply(config: TransformerConfig, name: str = "model") -> None:
    if getattr(config, "multi_latent_attention", False):
        _mla_local_down_projections()
        if not installed.transformer_engine():
            _mla_without_te()
        if _after_0_16():  # with TE too: its spec's q_proj is a plain TEColumnParallelLinear
            _mla_query_without_norm()
    if config.moe_router_enable_expert_bias:
        _expert_bias_counts_with_padding_mask()
    balancing = config.moe_router_load_balancing_type
    if "seq_aux_loss" in (balancing if isinstance(balancing, list) else [balancing]):
        seq_aux_loss.apply()  # per row of a THD pack, not the whole pack


class _NoTELinear:
    """Stands for TELinear where Transformer Engine is absent: nothing is one."""


def _mla_without_te() -> None:
    """transformer/multi_latent_attention.py without Transformer Engine: MLASelfAttention.__init__ asks
    `isinstance(self.linear_proj, TELinear)` whenever megatron.core.extensions.transformer_engine
    imports, which it does without TE too (0.16), binding TELinear to a MagicMock stub that isinstance
    refuses. A class in its place answers False there, and the down-projection checks
    (`in [TELinear]`) stay False."""
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.TELinear = _NoTELinear


def _mla_local_down_projections() -> None:
    """transformer/multi_latent_attention.py: the down-projection check `in [Linear,
    TEColumnParallelLinear, ColumnParallelLinear]` takes modelopt's `Linear` by identity (and from
    0.19 on the module imports it only along with TE, leaving None). r1mega's local spec (any backend
    but TE's, which gives TELinear and is checked first) gives MLA DuplicatedLinear
    (r1mega/models/specs.py), a Linear initialised as TELinear is, so the name is bound to that class."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.Linear = DuplicatedLinear


def _mla_query_without_norm() -> None:
    """transformer/mla_qk_norm_config.py (0.17+), QKNormConfigResolver._resolve_mla_qk_layernorm: without
    a query latent (q_lora_rank None, DeepSeek-V2-Lite) and with qk_layernorm on, it makes the query
    projection the backend's fused norm+linear whatever the spec says: a norm DeepSeek's q_proj does
    not have, and without Transformer Engine a stub class that cannot be built. r1mega's local spec
    gives a plain ColumnParallelLinear there, which this keeps."""
    from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

    upstream = QKNormConfigResolver._resolve_mla_qk_layernorm
    if getattr(upstream, "_r1mega_fix", False):
        return

    @functools.wraps(upstream)
    def _resolve_mla_qk_layernorm(self):
        out = upstream(self)
        spec = self.submodules.linear_q_proj
        if not self.has_q_lora and spec is not None and not self._is_fused_norm_linear(spec):
            out["linear_q_proj"] = spec
        return out

    _resolve_mla_qk_layernorm._r1mega_fix = True
    QKNormConfigResolver._resolve_mla_qk_layernorm = _resolve_mla_qk_layernorm


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
