"""Model FLOPs of a forward pass per token, from the config alone, and MFU.

Model FLOPs count the matrix multiplies the model needs (2 per multiply-add), not the work an
implementation does on top (recomputation, padding), as MFU in the PaLM and Megatron papers
does. One difference: a token of a causal sequence is charged attention to the positions it
sees, (s + 1) / 2 on average, not to all s (which counts the masked half as useful work).
A backward pass costs twice its forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from r1mega.config.schema import ModelConfig
from r1mega.models.builder import attention_weights

# Dense bf16/fp16 tensor-core peaks per device (TFLOP/s, no sparsity), by a substring of the
# name torch.cuda.get_device_name reports. fp32 models have no entry: set bench.peak_tflops.
KNOWN_PEAKS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H800": 989.0,
               "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0, "MI300X": 1307.0}


def _score_dims(m: ModelConfig) -> int:
    """Width of QK^T plus that of attention x V, summed over heads."""
    if m.mla is not None:
        a = m.mla
        return m.num_attention_heads * (a.qk_head_dim + a.qk_pos_emb_head_dim + a.v_head_dim)
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    return 2 * m.num_attention_heads * head_dim


def _mlp_weights(m: ModelConfig) -> float:
    """Weights one token multiplies in the MLPs of all layers (gated: three matrices each)."""
    h, L = m.hidden_size, m.num_layers
    if m.moe is None:
        return L * 3 * h * m.ffn_hidden_size
    e = m.moe
    dense = e.first_k_dense * 3 * h * (e.dense_ffn_hidden_size or m.ffn_hidden_size)
    routed = e.router_topk * 3 * h * e.ffn_hidden_size + 3 * h * (e.shared_expert_ffn_hidden_size or 0)
    return dense + (L - e.first_k_dense) * (routed + h * e.num_experts)


def forward_flops_per_token(m: ModelConfig, context: float) -> float:
    """Forward FLOPs of one token that attends to `context` positions (itself included)."""
    matmul = m.num_layers * attention_weights(m) + _mlp_weights(m) + m.vocab_size * m.hidden_size
    return 2.0 * matmul + 2.0 * m.num_layers * _score_dims(m) * context


def causal_context(seq_length: float) -> float:
    """Positions a token attends to on average in a causal sequence of this length."""
    return (seq_length + 1) / 2


def training_flops_per_token(m: ModelConfig, seq_length: float) -> float:
    """Forward and backward of one token of a causal sequence."""
    return 3.0 * forward_flops_per_token(m, causal_context(seq_length))


def device_peak_tflops(configured: Optional[float], dtype: str) -> Optional[float]:
    """The configured peak, else a known GPU's bf16/fp16 peak; None on CPU (no MFU there)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available() or dtype not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in sorted(KNOWN_PEAKS.items(), key=lambda kv: -len(kv[0])) if key in name), None)


def mfu(flops: float, seconds: float, peak_tflops: Optional[float], devices: int) -> Optional[float]:
    """Achieved share of the devices' peak; None without a peak."""
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12 * devices)
