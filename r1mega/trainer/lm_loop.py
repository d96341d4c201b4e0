"""Language-model pre-training loop (cfg.warmup): build, resume, step, log, save.

It pre-trains the built-in base model on task documents, and runs the synthetic rule
sequences on its own as the smallest end-to-end check of training, checkpoints and resume.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import torch.distributed as dist
from megatron.core import parallel_state

from r1mega.checkpoint.state import MARKER, latest_checkpoint, load_checkpoint, save_checkpoint
from r1mega.config.schema import R1Config
from r1mega.data.synthetic import SyntheticLM
from r1mega.models.builder import build_model, parameter_counts
from r1mega.platform.distributed import Runtime
from r1mega.platform.signals import STOP, Stopped
from r1mega.slurm.requeue import leave_requeue_file
from r1mega.trainer.lm_step import train_step
from r1mega.trainer.optimizer import build_optimizer

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: R1Config) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def final_model_dir(cfg: R1Config) -> Path:
    """Where a finished run exports its model (weights, model.yaml, tokenizer) for the next stage."""
    return Path(cfg.trainer.output_dir) / "model"


def export_model(cfg: R1Config, chunks: List[torch.nn.Module], tokenizer) -> Path:
    from r1mega.checkpoint.mcore import save_model
    from r1mega.checkpoint.staging import unwrap

    folder = final_model_dir(cfg)
    save_model([unwrap(c) for c in chunks], cfg.model, folder, tokenizer)
    return folder


def checkpoint_if_due(cfg: R1Config, runtime: Runtime, step: int, total: int, stop, save) -> bool:
    """After a step: save() when due, at the end, or when a stop was asked for (all ranks agree);
    True when the run must stop now."""
    t = cfg.trainer
    stopping = stop.agreed()
    if (t.save_every and step % t.save_every == 0) or (step == total and t.save_at_end) or stopping:
        path = save()
        if runtime.is_main:
            log.info("saved %s", path)
    if stopping:
        stop.stopped_early = step < total
        if runtime.is_main:
            log.warning("stop signal received: checkpoint saved at step %d, exiting", step)
            leave_requeue_file(cfg.cluster, stop)
    return stopping


def export_if_finished(cfg: R1Config, runtime: Runtime, step: int, total: int, chunks, tokenizer) -> None:
    """Export the model once the run has its steps (also when resumed past them)."""
    if step < total:
        return
    if step > total and runtime.is_main:
        log.warning("resumed at step %d, past the %d steps configured: exporting that model", step, total)
    path = export_model(cfg, chunks, tokenizer)
    if runtime.is_main:
        log.info("model: %s", path)


def resume_path(cfg: R1Config) -> Optional[Path]:
    """The checkpoint trainer.load names: None (fresh start), 'auto' (latest here, if any) or a path."""
    load = cfg.trainer.load
    if not load:
        return None
    if load == "auto":
        return latest_checkpoint(checkpoint_dir(cfg))
    path = Path(load)
    if (path / MARKER).is_file():
        return path
    # A checkpoints folder (step_<N>/ and `latest`) stands for its newest checkpoint; anything
    # else is returned as given, for load_checkpoint to reject with the path in the message.
    return latest_checkpoint(path) or path


def train(cfg: R1Config, runtime: Runtime, data=None) -> List[Dict[str, float]]:
    """Pre-train on the synthetic rule sequences (or `data`); return per-step metrics."""
    return run(cfg, runtime, data)[0]


def run(cfg: R1Config, runtime: Runtime, data=None) -> Tuple[List[Dict[str, float]], List[torch.nn.Module]]:
    """cfg.warmup.steps optimizer steps (counting those before a resume): (per-step metrics, model chunks).

    `data` yields micro-batches [b, seq_length + 1] with next_micro_batches(), state_dict() and
    load_state_dict(); default: the synthetic rule sequences.
    """
    total, active = parameter_counts(cfg.model)
    if runtime.is_main:
        log.info("model %s: %.2fM parameters, %.2fM active per token", cfg.model.name, total / 1e6,
                 active / 1e6)

    w = cfg.warmup
    chunks = build_model(cfg.model, cfg.parallel)
    ddp_chunks, optimizer, scheduler = build_optimizer(chunks, cfg.model, w.optimizer, w.steps)
    if data is None:
        data = SyntheticLM(cfg.model.vocab_size, w.seq_length, w.global_batch_size, w.micro_batch_size, w.seed,
                           parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())

    step = 0
    resume = resume_path(cfg)
    if resume is not None:
        state = load_checkpoint(resume, ddp_chunks, optimizer, scheduler)
        data.load_state_dict(state["data"])
        step = state["step"]
        if runtime.is_main:
            log.info("resumed from %s at step %d", resume, step)

    metrics_file = Path(cfg.trainer.output_dir) / "metrics.jsonl"
    if runtime.is_main:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
    tokens_per_step = w.global_batch_size * w.seq_length
    history: List[Dict[str, float]] = []
    while step < w.steps:
        start = time.perf_counter()
        out = train_step(ddp_chunks, optimizer, scheduler, data.next_micro_batches(), w.seq_length,
                         w.micro_batch_size)
        step += 1
        out = {"step": step, **out, "tokens_per_s": tokens_per_step / (time.perf_counter() - start)}
        history.append(out)
        if runtime.is_main:
            with metrics_file.open("a") as f:  # one line per step: a crash loses at most this one
                f.write(json.dumps(out) + "\n")
            if step % cfg.trainer.log_every == 0:
                log.info("step %d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s",
                         step, out["loss"], out["grad_norm"], out["lr"], out["tokens_per_s"])
        every = cfg.trainer.save_every
        at_end = step == w.steps and cfg.trainer.save_at_end
        if (every > 0 and step % every == 0) or at_end:
            path = save_checkpoint(checkpoint_dir(cfg), step, ddp_chunks, optimizer, scheduler,
                                   data.state_dict())
            if runtime.is_main:
                log.info("saved %s", path)
        if STOP.agreed():  # the base model's pre-training keeps no state worth a save of its own
            raise Stopped(f"stop signal: pre-training stopped at step {step} of {w.steps}")
    if dist.is_initialized():
        dist.barrier()
    return history, ddp_chunks
