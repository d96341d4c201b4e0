"""MLA's down-projections without Transformer Engine: one whole weight on every tensor-parallel rank."""

from __future__ import annotations

import torch
from megatron.core.post_training.modelopt.layers import Linear


class DuplicatedLinear(Linear):
    """megatron's local Linear (post_training/modelopt/layers.py: a torch Linear, whole on every TP
    rank, as TE's TELinear in "duplicated" mode), initialised with the config's init_method as
    TELinear is; the parent ignores init_method and keeps torch's default (uniform, bound 1/sqrt(in),
    about 2.5x the std of DeepSeek's 0.02 at hidden size 128). The default generator draws it, which
    runs in step on every tensor-parallel rank (their split layers draw from megatron's tracker), so
    the copies start equal."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)
