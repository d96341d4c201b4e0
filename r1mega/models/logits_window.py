"""Logits for a window of positions only: the output layer skips positions no loss reads.

An RL row is prompt + response, and only response positions carry a loss; with a vocabulary
of 150k, the prompt's logits are most of the [tokens, vocab] work and memory of a forward.
megatron's GPTModel projects every position, so a hook on its output layer keeps positions
[start:] of the hidden states. Under sequence parallelism the hook gathers the sequence
first and runs the output layer unsplit for that call, as megatron's own dynamic-batching
inference does to take last-token logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model


@contextmanager
def logits_from(model: torch.nn.Module, start: int) -> Iterator[None]:
    """While open, `model`'s output layer gives logits of positions start: only ([b, s - start, v])."""
    layer = None
    if start > 0 and get_attr_wrapped_model(model, "post_process"):
        layer = get_attr_wrapped_model(model, "output_layer")
    if layer is None:
        yield
        return
    split = layer.sequence_parallel

    def window(module, args):
        hidden = args[0]  # [s, b, h], or [s / tp, b, h] under sequence parallelism
        if split:
            # the layer's input copy all-reduces the gradient across TP, so the gather's
            # backward only has to take this rank's part (no second reduction)
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=module.tp_group)
            module.sequence_parallel = False
        return (hidden[start:], *args[1:])

    def restore(module, args, output):
        module.sequence_parallel = split

    handles = [layer.register_forward_pre_hook(window), layer.register_forward_hook(restore)]
    try:
        yield
    finally:
        layer.sequence_parallel = split
        for h in handles:
            h.remove()
