"""Optimizer set-up: megatron DDP wrappers, megatron's (distributed) optimizer and its LR scheduler."""

from __future__ import annotations

from typing import List, Tuple

import torch
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.utils import get_model_config

from r1mega.config.schema import ModelConfig, OptimizerConfig
from r1mega.models.builder import DTYPES


def megatron_optimizer_config(model: ModelConfig, opt: OptimizerConfig) -> MegatronOptimizerConfig:
    """Our optimizer group mapped onto megatron's OptimizerConfig; precision follows model.dtype."""
    if opt.name not in ("adam", "sgd"):
        raise ValueError(f"optimizer.name={opt.name!r} is not one of ['adam', 'sgd']")
    if opt.name == "sgd" and opt.distributed:
        raise ValueError("optimizer.name=sgd needs optimizer.distributed=false "
                         "(megatron's DistributedOptimizer shards Adam states only)")
    return MegatronOptimizerConfig(
        optimizer=opt.name,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        params_dtype=DTYPES[model.dtype],
        use_distributed_optimizer=opt.distributed,
    )


def _init_sgd_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Zero momentum buffers for a checkpoint to load into (a zero buffer steps like no buffer)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if group["momentum"] != 0 and "momentum_buffer" not in opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)


def build_scheduler(
    optimizer: MegatronOptimizer, opt: OptimizerConfig, total_steps: int
) -> OptimizerParamScheduler:
    """Linear warmup from 0, then constant / linear / cosine decay to min_lr over decay_steps.

    One scheduler step per optimizer step (megatron's own training counts samples instead).
    On resume the step count comes from the checkpoint and the shape from this config, so a
    run extended with a larger trainer.steps follows the new schedule.
    """
    if opt.decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(
            f"optimizer.decay_style={opt.decay_style!r} is not one of ['constant', 'cosine', 'linear']"
        )
    if opt.decay_steps is not None:
        decay_steps = opt.decay_steps
        if decay_steps <= opt.warmup_steps:
            raise ValueError(f"optimizer.decay_steps={decay_steps} must exceed optimizer.warmup_steps="
                             f"{opt.warmup_steps}")
    else:
        # Megatron asserts warmup < decay steps; a run shorter than its warmup just never decays.
        decay_steps = max(total_steps, opt.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def build_optimizer(
    chunks: List[torch.nn.Module], model: ModelConfig, opt: OptimizerConfig, total_steps: int
) -> Tuple[List[DistributedDataParallel], MegatronOptimizer, OptimizerParamScheduler]:
    """Wrap the chunks in megatron DDP and build optimizer + scheduler over them.

    Also points the model config at finalize_model_grads and the optimizer's loss scaling,
    which get_forward_backward_func reads from it (as megatron's own training loop does).
    """
    config = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=model.dtype != "fp32",
        use_distributed_optimizer=opt.distributed,
        # Overlap needs CUDA streams; without it all grads reduce once, after the last micro-batch.
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )
    ddp_chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(megatron_optimizer_config(model, opt), ddp_chunks)
    if opt.name == "sgd":
        # megatron gives SGD no state initialiser, yet calls it to build a checkpoint template
        # when loading (optimizer/optimizer.py, FP32Optimizer.sharded_state_dict(is_loading=True)).
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            sub.init_state_fn = _init_sgd_state
    scheduler = build_scheduler(optimizer, opt, total_steps)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp_chunks, optimizer, scheduler


def current_lr(optimizer: MegatronOptimizer) -> float:
    """Learning rate of the default parameter groups (the scheduler sets all groups alike)."""
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])
