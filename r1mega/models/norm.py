"""RMSNorm for the local (non-TE) layer spec."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 as HF Llama/Qwen do, with megatron's sequence-parallel marking.

    megatron's WrappedTorchNorm refuses sequence parallelism; under it each TP rank sees part
    of the sequence, so the weight carries `sequence_parallel` and finalize_model_grads
    all-reduces its gradient over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
