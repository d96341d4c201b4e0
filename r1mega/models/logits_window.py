"""Logits for a window of positions only: the output layer skips positions no loss reads.

An RL row is prompt + response, and only response positions carry a loss; with a vocabulary
of 150k, the prompt's logits are most of the [tokens, vocab] work and memory of a forward.
megatron's GPTModel projects every position, so a hook on its output layer keeps positions
[start:] of the hidden states (right-padded rows), or a list of positions (a THD pack, whose
responses lie between other rows' prompts). Under sequence parallelism the hook gathers the sequence
first and runs the output layer unsplit for that call, as megatron's own dynamic-batching
inference does to take last-token logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model


@contextmanager
def logits_from(model: torch.nn.Module, window: Union[int, torch.Tensor]) -> Iterator[None]:
    """While open, `model`'s output layer gives logits of positions window: only ([b, s - window, v])
    when `window` is an int, or of the positions a 1-D index tensor lists ([b, len(window), v])."""
    layer = None
    positional = isinstance(window, torch.Tensor)
    if (positional or window > 0) and get_attr_wrapped_model(model, "post_process"):
        layer = get_attr_wrapped_model(model, "output_layer")
    if layer is None:
        yield
        return
    split = layer.sequence_parallel

    def keep_window(module, args):
        hidden = args[0]  # [s, b, h], or [s / tp, b, h] under sequence parallelism
        if split:
            # the layer's input copy all-reduces the gradient across TP, so the gather's
            # backward only has to take this rank's part (no second reduction)
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=module.tp_group)
            module.sequence_parallel = False
        kept = hidden.index_select(0, window) if positional else hidden[window:]
        return (kept, *args[1:])

    def restore(module, args, output):
        module.sequence_parallel = split

    handles = [layer.register_forward_pre_hook(keep_window), layer.register_forward_hook(restore)]
    try:
        yield
    finally:
        layer.sequence_parallel = split
        for h in handles:
            h.remove()
