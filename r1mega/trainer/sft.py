"""The SFT run: conversations in, assistant-only loss over packed (or padded) micro-batches, eval loss,
checkpoints and resume, export.

Starts from model.hf_path, model.mcore_path (e.g. a previous stage's exported model) or the
built-in base model, like the RL run, and exports `<output_dir>/model` when it finishes. The loss
is the mean negative log-likelihood over every assistant token of the step's global batch: each
micro-batch carries the global token count as its denominator, so packing, micro-batching and
data parallelism do not change the math.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core import parallel_state as ps

from r1mega.config.schema import FP8Config, ParallelConfig, R1Config, SFTConfig
from r1mega.data.conversations import SFTSample, load_conversations, tokenize_all
from r1mega.data.packing import SFTMicroBatch, pack, pad_rows
from r1mega.data.sampler import PromptSampler
from r1mega.ops.logprobs import target_logprobs
from r1mega.models.mtp import mtp_metrics
from r1mega.platform.distributed import Runtime, dp_max, dp_share, dp_sum, reduce_last_stage
from r1mega.platform.fp8 import sequence_multiple
from r1mega.trainer.forward_backward import run_schedule, train_step
from r1mega.trainer.model_setup import build_policy, initial_weights, run_tokenizer
from r1mega.trainer.optimizer import current_lr
from r1mega.trainer.run import Job, export_model, run

log = logging.getLogger(__name__)

SFT_BAR = {"loss": "loss", "eval": "eval/loss"}


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

    def step(n: int) -> Dict[str, float]:
        start, lr = time.perf_counter(), current_lr(optimizer)
        parts = micro_batches(sampler.next_batch(), cfg.sft, cfg.parallel, cfg.model.fp8)
        metrics = sft_step(ddp, optimizer, scheduler, parts)
        return {**metrics, "lr": lr, "epoch": float(sampler.epoch), "time/step": time.perf_counter() - start}

    def evaluate_due(n: int) -> Dict[str, float]:
        every = cfg.sft.eval_every
        return _evaluate(cfg, ddp, valid) if n == steps or (every and n and n % every == 0) else {}

    return run(cfg, runtime, Job(
        "sft", steps, step, ddp, optimizer, scheduler, data_state=lambda: {"sampler": sampler.state_dict()},
        load_data_state=lambda state: sampler.load_state_dict(state["sampler"]), evaluate=evaluate_due,
        export=lambda: export_model(cfg, chunks, tokenizer), bar_keys=SFT_BAR))


def load_samples(cfg: R1Config, tokenizer) -> Tuple[List[SFTSample], List[SFTSample]]:
    """(train, valid) tokenised conversations of sft.train_files and sft.valid_files."""
    s = cfg.sft

    def samples(files, split):
        convs = load_conversations(files, s.on_bad_row, s.limits)
        return tokenize_all(convs, tokenizer, s.template, s.max_seq_length, s.on_bad_row, split)

    return samples(s.train_files, "train"), samples(s.valid_files, "valid")


def total_steps(cfg: R1Config, num_samples: int) -> int:
    """sft.steps, or the steps `sft.epochs` passes over the data take."""
    s = cfg.sft
    return s.steps or max(1, math.ceil(s.epochs * num_samples / s.samples_per_step))


def _evaluate(cfg: R1Config, chunks, valid: List[SFTSample]) -> Dict[str, float]:
    """Eval loss on the validation samples, each data-parallel rank on its share (padded with
    loss-free copies: ranks run forwards in lock-step)."""
    if not valid:
        return {}
    blank = SFTSample(valid[0].tokens, [False] * len(valid[0]), valid[0].source)
    mine, _ = dp_share(valid, blank)
    for chunk in chunks:
        chunk.eval()
    try:
        return eval_loss(chunks, micro_batches(mine, cfg.sft, cfg.parallel, cfg.model.fp8))
    finally:
        for chunk in chunks:
            chunk.train()


# -- the step ----------------------------------------------------------------------------------

def micro_batches(samples: Sequence[SFTSample], sft: SFTConfig, parallel: ParallelConfig,
                  fp8: FP8Config) -> List[SFTMicroBatch]:
    """This rank's samples as micro-batches; every data-parallel rank makes the same number of them."""
    multiple = sequence_multiple(fp8, parallel)  # sequence parallelism, FP8 shapes
    make = pack if sft.pack else pad_rows
    parts = make(samples, sft.micro_batch_tokens, multiple)
    count = int(dp_max([len(parts)])[0])
    if count > len(parts):
        parts = make(samples, sft.micro_batch_tokens, multiple, min_parts=count)
    return parts


def nll_loss(micro: SFTMicroBatch, logits: torch.Tensor, num_tokens: float, scale: float):
    """Summed NLL of the micro-batch's assistant targets over the step's global target count."""
    logp, _ = target_logprobs(logits, micro.targets)
    nll = -torch.where(micro.mask, logp, 0.0).sum()
    report = torch.stack([nll.detach(), micro.mask.sum().to(nll.dtype)]).double().cpu()
    # megatron divides each micro-batch loss by the local micro-batch count and averages
    # gradients over data-parallel ranks; `scale` undoes both, the global count stays.
    return nll / num_tokens * scale, {"sums": report}


def _target_count(parts: List[SFTMicroBatch]) -> float:
    return dp_sum([float(sum(int(m.mask.sum()) for m in parts))])[0]


def _sums(outputs: List[dict]) -> torch.Tensor:
    local = torch.zeros(2, dtype=torch.float64)
    for out in outputs or []:
        local += out["sums"]
    return reduce_last_stage(local)


def sft_step(ddp_chunks, optimizer, scheduler, parts: List[SFTMicroBatch]) -> Dict[str, float]:
    """Forward/backward over this rank's micro-batches, reduce grads, one optimizer step."""
    num_tokens = max(_target_count(parts), 1.0)
    scale = float(len(parts) * ps.get_data_parallel_world_size())
    out, grad_norm, update_ok = train_step(ddp_chunks, optimizer, scheduler, parts,
                                           partial(nll_loss, num_tokens=num_tokens, scale=scale),
                                           mtp_token_weight=scale / num_tokens)
    sums = _sums(out)
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "tokens": float(sums[1]), "grad_norm": grad_norm,
            "update_skipped": float(not update_ok), **mtp_metrics(ddp_chunks)}


def eval_loss(chunks, parts: List[SFTMicroBatch]) -> Dict[str, float]:
    """Mean NLL per assistant token (and its perplexity) without gradients."""
    with torch.no_grad():
        out = run_schedule(chunks, parts, partial(nll_loss, num_tokens=1.0, scale=1.0), forward_only=True)
    sums = _sums(out)
    loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp()), "eval/tokens": float(sums[1])}
