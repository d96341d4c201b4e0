"""The run loop shared by RL, SFT and pre-training.

A run is its steps; what they are is the job's business. The loop does the rest the same way
for all three: resume from `trainer.load`, write each step's metrics (metrics.jsonl,
TensorBoard, the progress bar), evaluate when the job says so, checkpoint every
`trainer.save_every` steps and at the end, stop cleanly on a stop signal (SIGTERM, or Slurm's
time-limit warning: save, leave the requeue note), and export the finished model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from r1mega.checkpoint.hf_config import hf_config_from_model
from r1mega.checkpoint.hf_convert import save_hf
from r1mega.checkpoint.mcore import save_model
from r1mega.checkpoint.staging import unwrap
from r1mega.checkpoint.state import MARKER, latest_checkpoint, load_checkpoint, save_checkpoint
from r1mega.config.schema import R1Config
from r1mega.models.builder import parameter_counts
from r1mega.platform.distributed import Runtime, barrier
from r1mega.platform.signals import STOP, Stopped
from r1mega.trainer.metrics import MetricsLog

log = logging.getLogger(__name__)

Metrics = Dict[str, float]


class AbortRun(RuntimeError):
    """Raised on every rank by a step that cannot go on (a rollout worker died): the run saves a
    checkpoint of its last finished step, then raises it on. `checkpoint` names that checkpoint."""

    checkpoint: Optional[Path] = None


@dataclass
class Job:
    """What differs between the RL, SFT and pre-training runs."""

    name: str  # progress-bar label
    steps: int  # all of the run's steps, counting those before a resume
    step: Callable[[int], Metrics]  # run step n (from 1), return its metrics
    ddp_chunks: Sequence[torch.nn.Module]
    optimizer: object
    scheduler: object
    data_state: Callable[[], dict]  # what a checkpoint keeps besides weights and optimizer
    load_data_state: Callable[[dict], None]
    reference: Optional[Sequence[torch.nn.Module]] = None  # the KL reference model, checkpointed too
    evaluate: Optional[Callable[[int], Metrics]] = None  # after step n (0: before the first); {} when not due
    export: Optional[Callable[[], Path]] = None  # the finished run's model
    # a stop signal saves a checkpoint; pre-training raises Stopped instead (no half-built base model)
    save_on_stop: bool = True
    bar_keys: Sequence[str] = ()  # metrics shown on the progress bar


def checkpoint_dir(cfg: R1Config) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def final_model_dir(cfg: R1Config) -> Path:
    """Where a finished run exports its model (weights, model.yaml, tokenizer) for the next stage."""
    return Path(cfg.trainer.output_dir) / "model"


def hf_model_dir(cfg: R1Config) -> Path:
    """Where a finished run writes its model as an HF folder (trainer.export_hf)."""
    return Path(cfg.trainer.output_dir) / "hf"


def export_model(cfg: R1Config, chunks: Sequence[torch.nn.Module], tokenizer) -> Path:
    """The finished model for the next stage, with the files of the checkpoint it started from and of
    its tokenizer's folder (hf_files); with trainer.export_hf, also as an HF folder beside it."""
    folder, chunks = final_model_dir(cfg), [unwrap(c) for c in chunks]
    sources = [cfg.model.mcore_path or cfg.model.hf_path, getattr(tokenizer, "name_or_path", None)]
    save_model(chunks, cfg.model, folder, tokenizer, carry_from=sources)
    if cfg.trainer.export_hf:
        save_hf(chunks, cfg.model, hf_model_dir(cfg), carry_from=[folder])
    return folder


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


def run(cfg: R1Config, runtime: Runtime, job: Job) -> List[Metrics]:
    """job.steps steps (counting those before a resume); per-step metrics of this process's steps."""
    t = cfg.trainer
    if runtime.is_main:
        total, active = parameter_counts(cfg.model)
        log.info("model %s: %.2fM parameters, %.2fM active per token", cfg.model.name, total / 1e6, active / 1e6)
    if job.export is not None and cfg.trainer.export_hf:
        hf_config_from_model(cfg.model)  # no HF export for this architecture: say so before training
    step = _resume(cfg, runtime, job)
    out: Optional[MetricsLog] = None
    if runtime.is_main:
        out = MetricsLog(t.output_dir, job.steps, t.tensorboard, t.progress, start_step=step, desc=job.name,
                         bar_keys=job.bar_keys)
    history: List[Metrics] = []
    try:
        with STOP as stop:
            if job.evaluate is not None and step == 0:
                metrics = job.evaluate(0)
                if out is not None and metrics:
                    out.write(0, metrics)
            while step < job.steps:
                try:
                    metrics = job.step(step + 1)
                except AbortRun as e:
                    if job.save_on_stop and step > 0:
                        e.checkpoint = save_checkpoint(checkpoint_dir(cfg), step, job.ddp_chunks, job.optimizer,
                                                       job.scheduler, job.data_state(), reference=job.reference)
                    raise
                step += 1
                if job.evaluate is not None:
                    metrics.update(job.evaluate(step))
                history.append({"step": step, **metrics})
                if out is not None:
                    out.write(step, metrics, console=step % t.log_every == 0)
                if _checkpoint_if_due(cfg, runtime, job, step, stop):
                    break
        if step >= job.steps and job.export is not None:
            if step > job.steps and runtime.is_main:
                log.warning("resumed at step %d, past the %d steps configured: exporting that model", step,
                            job.steps)
            path = job.export()
            if runtime.is_main:
                log.info("model: %s", path)
    finally:
        if out is not None:
            out.close()
    barrier()
    return history


def _resume(cfg: R1Config, runtime: Runtime, job: Job) -> int:
    folder = resume_path(cfg)
    if folder is None:
        return 0
    state = load_checkpoint(folder, job.ddp_chunks, job.optimizer, job.scheduler, reference=job.reference)
    try:
        job.load_data_state(state["data"])
    except ValueError as e:
        raise ValueError(f"checkpoint {folder}: {e}") from None
    if runtime.is_main:
        log.info("resumed from %s at step %d", folder, state["step"])
    return state["step"]


def _checkpoint_if_due(cfg: R1Config, runtime: Runtime, job: Job, step: int, stop) -> bool:
    """After a step: save when due, at the end, or when a stop was asked for (all ranks agree);
    True when the run must stop now."""
    t = cfg.trainer
    stopping = stop.agreed()
    due = (t.save_every and step % t.save_every == 0) or (step == job.steps and t.save_at_end)
    if due or (stopping and job.save_on_stop):
        path = save_checkpoint(checkpoint_dir(cfg), step, job.ddp_chunks, job.optimizer, job.scheduler,
                               job.data_state(), reference=job.reference)
        if runtime.is_main:
            log.info("saved %s", path)
    if stopping and not job.save_on_stop:
        raise Stopped(f"stop signal: {job.name} stopped at step {step} of {job.steps}")
    if stopping:
        stop.stopped_early = step < job.steps
        if runtime.is_main:
            log.warning("stop signal received: checkpoint saved at step %d, exiting", step)
            stop.stop_saved()
    return stopping
