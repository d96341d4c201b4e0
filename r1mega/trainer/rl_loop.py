"""The RL run: set up, resume, step, evaluate, log, checkpoint (also on a stop signal), plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from r1mega.checkpoint.state import load_checkpoint, save_checkpoint
from r1mega.config.schema import R1Config
from r1mega.models.builder import parameter_counts
from r1mega.platform.distributed import Runtime
from r1mega.platform.signals import STOP
from r1mega.trainer.evaluate import evaluate
from r1mega.trainer.lm_loop import checkpoint_dir, checkpoint_if_due, export_if_finished, resume_path
from r1mega.trainer.metrics import METRICS_FILE, MetricsLog, plot_curves
from r1mega.trainer.rl_context import RLContext
from r1mega.trainer.rl_setup import setup
from r1mega.trainer.rl_step import rl_step

log = logging.getLogger(__name__)


def _data_state(ctx: RLContext) -> dict:
    return {"sampler": ctx.sampler.state_dict(), "engine": ctx.engine.state_dict()}


def _restore(ctx: RLContext, folder: Path) -> int:
    state = load_checkpoint(folder, ctx.ddp_chunks, ctx.optimizer, ctx.scheduler, reference=ctx.ref_chunks)
    ctx.sampler.load_state_dict(state["data"]["sampler"])
    ctx.engine.load_state_dict(state["data"]["engine"])
    return state["step"]


def _save(ctx: RLContext, step: int) -> Path:
    return save_checkpoint(checkpoint_dir(ctx.cfg), step, ctx.ddp_chunks, ctx.optimizer, ctx.scheduler,
                           _data_state(ctx), reference=ctx.ref_chunks)


def train(cfg: R1Config, runtime: Runtime) -> List[Dict[str, float]]:
    """Run GRPO for cfg.trainer.steps steps (counting those before a resume); return per-step metrics."""
    total, active = parameter_counts(cfg.model)
    if runtime.is_main:
        log.info("model %s: %.2fM parameters, %.2fM active per token", cfg.model.name, total / 1e6, active / 1e6)
    ctx = setup(cfg, runtime)
    step = 0
    resume = resume_path(cfg)
    if resume is not None:
        step = _restore(ctx, resume)
        if runtime.is_main:
            log.info("resumed from %s at step %d", resume, step)
    t = cfg.trainer
    out: Optional[MetricsLog] = None
    if runtime.is_main:
        out = MetricsLog(t.output_dir, t.steps, t.tensorboard, t.progress, start_step=step)
    history: List[Dict[str, float]] = []
    try:
        with STOP as stop:
            if t.eval_at_ends and step == 0:
                _evaluate(ctx, out, 0)
            while step < t.steps:
                metrics = rl_step(ctx, step + 1)
                step += 1
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    metrics.update(evaluate(ctx, seed=step))
                if step == t.steps and t.eval_at_ends:
                    metrics.update(evaluate(ctx, seed=step))
                history.append({"step": step, **metrics})
                if out is not None:
                    out.write(step, metrics, console=step % t.log_every == 0)
                if checkpoint_if_due(cfg, runtime, step, t.steps, stop, lambda: _save(ctx, step)):
                    break
        export_if_finished(cfg, runtime, step, t.steps, ctx.chunks, ctx.tokenizer)
    finally:
        ctx.engine.shutdown()
        if ctx.rewards is not None:
            ctx.rewards.close()
        if out is not None:
            out.close()
    if runtime.is_main and t.plot and (Path(t.output_dir) / METRICS_FILE).is_file():
        log.info("curves: %s", plot_curves(Path(t.output_dir) / METRICS_FILE))
    if dist.is_initialized():
        dist.barrier()
    return history


def _evaluate(ctx: RLContext, out: Optional[MetricsLog], step: int) -> None:
    metrics = evaluate(ctx, seed=step)
    if out is not None and metrics:
        out.write(step, metrics)

