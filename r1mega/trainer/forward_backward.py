"""Micro-batches through megatron's pipeline schedules (`get_forward_backward_func`), and the
optimizer step after them.

Shared by the RL, SFT and pre-training steps. A micro-batch knows its model inputs
(`model_inputs()`, and optionally `logits_window`: the first position any loss reads, or the
positions it reads; `targets_by_position()` where the model has MTP layers); a loss function turns
(micro-batch, this rank's vocab slice of the logits) into (loss, report).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.utils import get_model_config, unwrap_model

from r1mega.models.logits_window import logits_from
from r1mega.models.mtp import predicting_further, runs_mtp
from r1mega.models.routing_replay import replaying, replays_here, router_order
from r1mega.models.seq_aux_loss import rows_of


def forward_step(data_iterator, model, loss_fn, around: Optional[Callable] = None,
                 mtp_token_weight: Optional[float] = None):
    """The next micro-batch through `model`; `around(micro)`, when given, is a context the forward runs in.
    A training forward also trains the MTP layers where the loss reads, each token weighted by
    `mtp_token_weight` as the loss weights it (r1mega.models.mtp)."""
    micro = next(data_iterator).to(next(model.parameters()).device)
    mtp = nullcontext()
    if runs_mtp(model) and torch.is_grad_enabled():
        mtp = predicting_further(model, *micro.targets_by_position(), mtp_token_weight)
    with logits_from(model, getattr(micro, "logits_window", 0)), _routing(model, micro), mtp, \
            (around(micro) if around is not None else nullcontext()):
        logits = model(**_model_inputs(model, micro))
    return logits, partial(loss_fn, micro)


@contextmanager
def _routing(model: torch.nn.Module, micro):
    """MoE routers during this forward: they replay the micro-batch's routing where it carries some
    and they replay (r1mega.models.routing_replay), and a pack's sequence-wise load-balancing loss is
    taken per row (r1mega.models.seq_aux_loss)."""
    chunk = unwrap_model(model)
    routing = getattr(micro, "routing", None)
    with ExitStack() as stack:
        if routing is not None and replays_here(chunk):
            stack.enter_context(replaying(chunk, routing, micro.pad))
        rows = _pack_rows(micro) if chunk.config.num_moe_experts else None
        if rows is not None:
            stack.enter_context(rows_of(router_order(rows[0], chunk.config.sequence_parallel), rows[1]))
        yield


def _pack_rows(micro):
    """(the row of every position [1, T], -1 at padding; the number of rows) of a THD pack; None for
    padded rows. An RL pack says (its context-parallel part holds only some positions); an SFT pack's
    follow from its boundaries."""
    rows = getattr(micro, "row_index", None)
    if rows is not None:
        return rows, len(micro.rows)
    cu = getattr(micro, "cu_seqlens", None)
    if cu is None or micro.pad is None:
        return None
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), (cu[1:] - cu[:-1]).long())
    segment = torch.where(micro.pad[0], -1, segment)
    return segment.unsqueeze(0), int(segment.max()) + 1


def _model_inputs(model: torch.nn.Module, micro) -> dict:
    """The micro-batch's model inputs; its MoE padding mask only where routers read it, in their layout."""
    inputs = micro.model_inputs()
    config = get_model_config(model)
    if config.num_moe_experts is None or inputs.get("padding_mask") is None:
        inputs.pop("padding_mask", None)  # dense layers never read it
    elif config.sequence_parallel and not unwrap_model(model).pre_process:
        # megatron scatters the mask to the sequence-parallel layout only on the embedding's stage;
        # later stages' routers see this rank's slice of the sequence as well
        mask = inputs["padding_mask"].transpose(0, 1).contiguous()
        inputs["padding_mask"] = scatter_to_sequence_parallel_region(mask).transpose(0, 1).contiguous()
    return inputs


def run_schedule(chunks: Sequence[torch.nn.Module], micro_batches: list, loss_fn: Optional[Callable],
                 forward_only: bool, step: Optional[Callable] = None,
                 shape: Optional[Tuple[int, int]] = None, mtp_token_weight: Optional[float] = None) -> List[dict]:
    """Every micro-batch through the model chunks; the reports of the last pipeline stage.

    `step(data_iterator, model)` replaces the default forward step (model inputs, then loss_fn);
    `shape` = (seq_length, micro_batch_size) when every micro-batch has it, else the largest;
    `mtp_token_weight`: see forward_step.
    """
    iterators = [iter(micro_batches) for _ in chunks]  # interleaved pipelining pulls per chunk
    if shape is None:  # shapes are exchanged per micro-batch (variable_seq_lengths)
        shape = (max(m.tokens.size(1) for m in micro_batches), max(m.tokens.size(0) for m in micro_batches))
    return get_forward_backward_func()(
        forward_step_func=step or partial(forward_step, loss_fn=loss_fn, mtp_token_weight=mtp_token_weight),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(micro_batches),
        seq_length=shape[0],
        micro_batch_size=shape[1],
        forward_only=forward_only,
    )


def train_step(ddp_chunks: Sequence[torch.nn.Module], optimizer, scheduler, micro_batches: list,
               loss_fn: Optional[Callable], **schedule) -> Tuple[List[dict], float, bool]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step:
    (the last stage's reports, grad norm before clipping, whether the update was applied)."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(ddp_chunks, micro_batches, loss_fn, forward_only=False, **schedule)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:  # fp16 loss-scale overflow skips the step and keeps the schedule
        scheduler.step(increment=1)
    return outputs, float(grad_norm) if grad_norm is not None else float("nan"), bool(update_ok)
