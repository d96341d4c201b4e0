"""The SFT run: conversations in, assistant-only loss, eval loss, checkpoints and resume, export.

Starts from model.hf_path, model.mcore_path (e.g. a previous stage's exported model) or the
built-in base model, like the RL run, and exports `<output_dir>/model` when it finishes.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.checkpoint.state import load_checkpoint, save_checkpoint
from r1mega.config.schema import R1Config
from r1mega.data.conversations import SFTSample, load_conversations, tokenize_all
from r1mega.data.sampler import PromptSampler
from r1mega.platform.distributed import Runtime
from r1mega.platform.signals import STOP
from r1mega.trainer.lm_loop import checkpoint_dir, checkpoint_if_due, export_if_finished, resume_path
from r1mega.trainer.lm_step import current_lr
from r1mega.trainer.metrics import MetricsLog
from r1mega.trainer.rl_setup import build_policy, initial_weights, run_tokenizer
from r1mega.trainer.sft_step import eval_loss, micro_batches, sft_step

log = logging.getLogger(__name__)


def load_samples(cfg: R1Config, tokenizer) -> Tuple[List[SFTSample], List[SFTSample]]:
    """(train, valid) tokenised conversations of sft.train_files and sft.valid_files."""
    s = cfg.sft

    def samples(files, split):
        convs = load_conversations(files, s.on_bad_row)
        return tokenize_all(convs, tokenizer, s.template, s.max_seq_length, s.on_bad_row, split)

    return samples(s.train_files, "train"), samples(s.valid_files, "valid")


def total_steps(cfg: R1Config, num_samples: int) -> int:
    """sft.steps, or the steps `sft.epochs` passes over the data take."""
    s = cfg.sft
    return s.steps or max(1, math.ceil(s.epochs * num_samples / s.samples_per_step))


def _valid_shard(valid: List[SFTSample]) -> List[SFTSample]:
    """This data-parallel rank's share of the validation samples, padded with loss-free copies to the
    same count on every rank (ranks run forwards in lock-step under expert parallelism)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = valid[rank::dp]
    blank = SFTSample(valid[0].tokens, [False] * len(valid[0]), valid[0].source)
    return mine + [blank] * (-(-len(valid) // dp) - len(mine))


def _evaluate(cfg: R1Config, chunks, valid: List[SFTSample]) -> Dict[str, float]:
    if not valid:
        return {}
    for chunk in chunks:
        chunk.eval()
    try:
        return eval_loss(chunks, micro_batches(_valid_shard(valid), cfg.sft, cfg.parallel,
                                                   cfg.model.fp8))
    finally:
        for chunk in chunks:
            chunk.train()


def train(cfg: R1Config, runtime: Runtime) -> List[Dict[str, float]]:
    """Fine-tune for the configured steps (counting those before a resume); per-step metrics."""
    tokenizer = run_tokenizer(cfg)
    train_samples, valid = load_samples(cfg, tokenizer)
    steps = total_steps(cfg, len(train_samples))
    if runtime.is_main:
        log.info("sft: %d train and %d valid conversations, %d steps of %d", len(train_samples), len(valid),
                 steps, cfg.sft.samples_per_step)
    chunks, ddp, optimizer, scheduler = build_policy(cfg, initial_weights(cfg, runtime, tokenizer), steps)
    sampler = PromptSampler(train_samples, cfg.sft.samples_per_step, cfg.sft.seed, ps.get_data_parallel_rank(),
                            ps.get_data_parallel_world_size())
    step = 0
    resume = resume_path(cfg)
    if resume is not None:
        state = load_checkpoint(resume, ddp, optimizer, scheduler)
        sampler.load_state_dict(state["data"]["sampler"])
        step = state["step"]
        if runtime.is_main:
            log.info("resumed from %s at step %d", resume, step)
    t = cfg.trainer
    out: Optional[MetricsLog] = None
    if runtime.is_main:
        out = MetricsLog(t.output_dir, steps, t.tensorboard, t.progress, start_step=step, desc="sft")
    history: List[Dict[str, float]] = []
    try:
        with STOP as stop:
            while step < steps:
                lr = current_lr(optimizer)
                metrics = sft_step(ddp, optimizer, scheduler, micro_batches(sampler.next_batch(), cfg.sft,
                                                                           cfg.parallel, cfg.model.fp8))
                step += 1
                metrics.update(lr=lr, epoch=float(sampler.epoch))
                every = cfg.sft.eval_every
                if step == steps or (every and step % every == 0):
                    metrics.update(_evaluate(cfg, ddp, valid))
                history.append({"step": step, **metrics})
                if out is not None:
                    out.write(step, metrics, console=step % t.log_every == 0)
                save = lambda: save_checkpoint(checkpoint_dir(cfg), step, ddp, optimizer,  # noqa: E731
                                               scheduler, {"sampler": sampler.state_dict()})
                if checkpoint_if_due(cfg, runtime, step, steps, stop, save):
                    break
        export_if_finished(cfg, runtime, step, steps, chunks, tokenizer)
    finally:
        if out is not None:
            out.close()
    if dist.is_initialized():
        dist.barrier()
    return history

