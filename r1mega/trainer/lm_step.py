"""One next-token-prediction training step through megatron's pipeline schedules."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega.platform.distributed import current_device


def _forward_step(data_iterator, model):
    """Forward one micro-batch [b, s+1] of token ids; return per-token losses and their reducer."""
    batch = next(data_iterator)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # Every pipeline stage reads the batch: the first for tokens, all for rotary positions,
    # the last for labels. Non-last stages return hidden states and ignore the loss function.
    output = model(tokens, positions, attention_mask=None, labels=labels)
    return output, _loss_func


def _loss_func(per_token_loss: torch.Tensor):
    # (sum, count, report): megatron divides by the count per micro-batch and by the number
    # of micro-batches, or, with config.calculate_per_token_loss, by the global token count
    # in finalize_model_grads. Both give the token mean when micro-batches have equal counts.
    loss_sum = per_token_loss.float().sum()
    num_tokens = torch.tensor(per_token_loss.numel(), dtype=torch.int, device=per_token_loss.device)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm_loss": report}


def current_lr(optimizer: MegatronOptimizer) -> float:
    """Learning rate of the default parameter groups (the scheduler sets all groups alike)."""
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])


def _global_mean_loss(outputs: List[dict], device: torch.device) -> float:
    """Token-mean loss of the whole global batch, on every rank (rank 0 may be a first stage)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for out in outputs:
            total += out["lm_loss"].double()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(
    ddp_chunks: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    micro_batches: List[torch.Tensor],
    seq_length: int,
    micro_batch_size: int,
) -> Dict[str, float]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step.

    Returns loss (token mean over the global batch), grad_norm (before clipping) and the lr
    this step used; the same numbers on every rank.
    """
    micro_batches = [b.to(current_device(), non_blocking=True) for b in micro_batches]
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = current_lr(optimizer)
    # Interleaved pipelining pulls micro-batches per chunk: one iterator for each.
    iterators = [iter(micro_batches) for _ in ddp_chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=ddp_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:  # fp16 loss-scale overflow skips the step and keeps the schedule
        scheduler.step(increment=1)
    return {
        "loss": _global_mean_loss(outputs, micro_batches[0].device),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "skipped": float(not update_successful),
    }
