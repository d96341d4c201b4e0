"""Forward/backward of model-input micro-batches through megatron's pipeline schedules.

Shared by the RL and SFT trainers: a micro-batch knows its model inputs (`model_inputs()`),
a loss function turns (micro-batch, this rank's vocab slice of the logits) into
(loss, report); log-probs of target tokens come from the one vocab-parallel dispatch point.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega.models.logits_window import logits_from
from r1mega.ops.logprobs import token_logprobs
from r1mega.platform.distributed import current_device


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False):
    """Log-probs [b, L] of `targets` (and the entropy) from this rank's vocab slice of the logits."""
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    vocab_start = ps.get_tensor_model_parallel_rank() * logits.size(-1)
    return token_logprobs(logits, targets, tp_group, vocab_start, temperature, with_entropy)


def _forward_step(data_iterator, model, loss_fn):
    micro = next(data_iterator).to(next(model.parameters()).device)
    with logits_from(model, getattr(micro, "logits_from", 0)):
        logits = model(**micro.model_inputs())
    return logits, partial(loss_fn, micro)


def run_schedule(chunks: Sequence[torch.nn.Module], micro_batches: list, loss_fn: Callable,
                 forward_only: bool) -> List[dict]:
    """Every micro-batch through the model chunks; the reports of the last pipeline stage."""
    iterators = [iter(micro_batches) for _ in chunks]  # interleaved pipelining pulls per chunk
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn=loss_fn),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(micro_batches),
        seq_length=max(m.tokens.size(1) for m in micro_batches),  # shapes are exchanged per micro-batch
        micro_batch_size=max(m.tokens.size(0) for m in micro_batches),
        forward_only=forward_only,
    )


def train_step(ddp_chunks: Sequence[torch.nn.Module], optimizer, scheduler, micro_batches: list,
               loss_fn: Callable) -> Tuple[List[dict], float, bool]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step:
    (the last stage's reports, grad norm before clipping, whether the update was applied)."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(ddp_chunks, micro_batches, loss_fn, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:  # fp16 loss-scale overflow skips the step and keeps the schedule
        scheduler.step(increment=1)
    return outputs, float(grad_norm) if grad_norm is not None else float("nan"), bool(update_ok)


def reduce_last_stage(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Values held by last pipeline stages (zeros elsewhere), reduced over data-parallel ranks and
    shared with every stage: the same result on every rank."""
    out = values.to(current_device())
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        out = torch.zeros_like(out) if op == dist.ReduceOp.SUM else torch.full_like(out, -float("inf"))
    for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
        dist.all_reduce(out, op=op, group=group)
    return out.cpu()


def dp_sum(values: List[float], op=dist.ReduceOp.SUM) -> List[float]:
    """Sum (or op) of per-rank numbers over the data-parallel group."""
    t = torch.tensor(values, dtype=torch.float64, device=current_device())
    dist.all_reduce(t, op=op, group=ps.get_data_parallel_group())
    return t.cpu().tolist()
