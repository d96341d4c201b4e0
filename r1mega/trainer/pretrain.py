"""Pre-training of the built-in base model: next-token prediction on a corpus, cached on disk.

The default run starts reinforcement learning from this base model, as R1-Zero starts from a
base model. The corpus (`pretrain.corpus`) is the built-in task's worked documents, or rule
sequences (r1mega.data.synthetic) that need no tokenizer, the smallest end-to-end check of
training, checkpoints and resume. The cache key covers everything that shapes the weights
(model, pre-training settings, task, tokenizer; not the parallel layout), so changing any of
them builds a new base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state as ps

from r1mega.checkpoint.mcore import MODEL_YAML, save_model
from r1mega.checkpoint.staging import unwrap
from r1mega.config.schema import R1Config
from r1mega.data.corpus import TaskCorpus, corpus_tokens
from r1mega.data.synthetic import SyntheticLM
from r1mega.data.tasks import make_task
from r1mega.models.builder import build_model
from r1mega.models.mtp import mtp_metrics, predicting_further, runs_mtp
from r1mega.platform.distributed import Runtime, current_device, reduce_last_stage, seed_everything
from r1mega.trainer.forward_backward import train_step as forward_backward_step
from r1mega.trainer.optimizer import build_optimizer, current_lr
from r1mega.trainer.run import Job, run

log = logging.getLogger(__name__)

PRETRAIN_BAR = {"loss": "loss"}


def base_model_dir(cfg: R1Config, tokenizer) -> Path:
    w = cfg.pretrain
    model = asdict(cfg.model)
    if model["mtp"] is None:  # off: the digest of base models cached before the field existed
        del model["mtp"]
    recipe = {
        "model": model,
        "pretrain": {k: v for k, v in asdict(w).items() if k != "cache_dir"},
        "task": [cfg.data.name, dict(cfg.data.difficulty), cfg.data.seed, cfg.data.template, cfg.data.train_size],
        "vocab": sorted(tokenizer.get_vocab().items()),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(w.cache_dir) / f"{cfg.model.name}-{cfg.data.name}-{digest}"


def ensure_base_model(cfg: R1Config, runtime: Runtime, tokenizer) -> Path:
    """The cached base model's folder, pre-training it first if it is not there yet."""
    folder = base_model_dir(cfg, tokenizer)
    if (folder / MODEL_YAML).is_file():
        if runtime.is_main:
            log.info("base model: %s (cached)", folder)
        return folder
    w = cfg.pretrain
    if w.corpus == "task" and cfg.data.name not in ("arithmetic", "countdown", "code"):
        raise ValueError(f"warm-up pre-trains on a built-in task, not data.name={cfg.data.name!r}: "
                         "set model.hf_path or model.mcore_path, or pretrain.enabled=false")
    if runtime.is_main:
        what = (f"{w.documents} {cfg.data.name} documents ({100 * w.correct_fraction:.0f}% worked right)"
                if w.corpus == "task" else "rule sequences")
        log.info("building the base model: %d pre-training steps on %s", w.steps, what)
    run_dir = folder.with_name(folder.name + ".run")
    sub = replace(cfg, trainer=replace(cfg.trainer, output_dir=str(run_dir), save_every=0, save_at_end=False,
                                       load=None))
    seed_everything(w.seed)
    history = train(sub, runtime, tokenizer, export_to=folder)
    if runtime.is_main and history:
        log.info("base model: loss %.3f -> %.3f", history[0]["loss"], history[-1]["loss"])
    seed_everything(cfg.trainer.seed)  # the RL run's randomness does not depend on the cache state
    return folder


def corpus(cfg: R1Config, tokenizer=None):
    """pretrain.corpus as global batches [global_batch_size, seq_length + 1], this rank's micro-batches."""
    w, d = cfg.pretrain, cfg.data
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if w.corpus == "synthetic":
        return SyntheticLM(cfg.model.vocab_size, w.seq_length, w.global_batch_size, w.micro_batch_size, w.seed,
                           dp_rank, dp_size)
    records = make_task(d.name, "train", w.documents, d.seed + 1, **dict(d.difficulty))
    stream = corpus_tokens(records, tokenizer, d.template, w.correct_fraction, w.seed)
    return TaskCorpus(stream, w.seq_length, w.global_batch_size, w.micro_batch_size, dp_rank, dp_size)


def train(cfg: R1Config, runtime: Runtime, tokenizer=None, export_to: Optional[Path] = None
          ) -> List[Dict[str, float]]:
    """pretrain.steps optimizer steps on pretrain.corpus (counting those before a resume); per-step
    metrics. The finished model goes to `export_to` (weights and model.yaml), if given."""
    w = cfg.pretrain
    chunks = build_model(cfg.model, cfg.parallel)
    ddp, optimizer, scheduler = build_optimizer(chunks, cfg.model, w.optimizer, w.steps)
    data = corpus(cfg, tokenizer)
    tokens_per_step = w.global_batch_size * w.seq_length

    def step(n: int) -> Dict[str, float]:
        start = time.perf_counter()
        out = train_step(ddp, optimizer, scheduler, data.next_micro_batches(), w.seq_length, w.micro_batch_size)
        return {**out, "tokens_per_s": tokens_per_step / (time.perf_counter() - start)}

    def export() -> Path:
        save_model([unwrap(c) for c in chunks], cfg.model, export_to)
        return export_to

    return run(cfg, runtime, Job(
        "pre-training", w.steps, step, ddp, optimizer, scheduler, data_state=data.state_dict,
        load_data_state=data.load_state_dict, export=export if export_to else None, save_on_stop=False,
        bar_keys=PRETRAIN_BAR))


# -- the step ----------------------------------------------------------------------------------

def _forward_step(data_iterator, model):
    """Forward one micro-batch [b, s+1] of token ids; return per-token losses and their reducer."""
    batch = next(data_iterator)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # Every pipeline stage reads the batch: the first for tokens, all for rotary positions,
    # the last for labels. Non-last stages return hidden states and ignore the loss function.
    with predicting_further(model, labels, torch.ones_like(labels, dtype=torch.bool)) if runs_mtp(model) \
            else nullcontext():  # every position trains the MTP layers too
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


def train_step(ddp_chunks: List[torch.nn.Module], optimizer, scheduler, micro_batches: List[torch.Tensor],
               seq_length: int, micro_batch_size: int) -> Dict[str, float]:
    """Forward/backward over this rank's micro-batches [b, s + 1], reduce grads, one optimizer step.

    Returns loss (token mean over the global batch), grad_norm (before clipping) and the lr
    this step used; the same numbers on every rank.
    """
    micro_batches = [b.to(current_device(), non_blocking=True) for b in micro_batches]
    lr = current_lr(optimizer)
    outputs, grad_norm, update_ok = forward_backward_step(
        ddp_chunks, optimizer, scheduler, micro_batches, None, step=_forward_step,
        shape=(seq_length, micro_batch_size))
    total = torch.zeros(2, dtype=torch.float64)
    for out in outputs or []:
        total += out["lm_loss"].double().cpu()
    total = reduce_last_stage(total)
    return {"loss": (total[0] / total[1].clamp(min=1)).item(), "grad_norm": grad_norm, "lr": lr,
            "skipped": float(not update_ok), **mtp_metrics(ddp_chunks)}
