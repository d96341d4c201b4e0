"""The built-in base model: pre-trained once on the built-in task's corpus, then cached on disk.

The default run starts reinforcement learning from it, as R1-Zero starts from a base model.
The cache key covers everything that shapes the weights (model, warm-up, task, tokenizer,
layout-independent), so changing any of them builds a new base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from megatron.core import parallel_state as ps

from r1mega.checkpoint.mcore import MODEL_YAML, save_model
from r1mega.checkpoint.staging import unwrap
from r1mega.config.schema import R1Config
from r1mega.data.corpus import TaskCorpus, corpus_tokens
from r1mega.data.tasks import make_task
from r1mega.platform.distributed import Runtime, seed_everything
from r1mega.trainer import lm_loop

log = logging.getLogger(__name__)


def base_model_dir(cfg: R1Config, tokenizer) -> Path:
    w = cfg.warmup
    recipe = {
        "model": asdict(cfg.model),
        "warmup": {k: v for k, v in asdict(w).items() if k != "cache_dir"},
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
    if cfg.data.name not in ("arithmetic", "countdown"):
        raise ValueError(f"warm-up pre-trains on a built-in task, not data.name={cfg.data.name!r}: "
                         "set model.hf_path or model.mcore_path, or warmup.enabled=false")
    w = cfg.warmup
    if runtime.is_main:
        log.info("building the base model: %d pre-training steps on %d %s documents (%.0f%% worked right)",
                 w.steps, w.documents, cfg.data.name, 100 * w.correct_fraction)
    records = make_task(cfg.data.name, "train", w.documents, cfg.data.seed + 1, **dict(cfg.data.difficulty))
    stream = corpus_tokens(records, tokenizer, cfg.data.template, w.correct_fraction, w.seed)
    data = TaskCorpus(stream, w.seq_length, w.global_batch_size, w.micro_batch_size,
                      ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    run_dir = folder.with_name(folder.name + ".run")
    sub = replace(cfg, trainer=replace(cfg.trainer, output_dir=str(run_dir), save_every=0, save_at_end=False,
                                       load=None))
    seed_everything(w.seed)
    history, chunks = lm_loop.run(sub, runtime, data)
    if runtime.is_main and history:
        log.info("base model: loss %.3f -> %.3f", history[0]["loss"], history[-1]["loss"])
    save_model([unwrap(c) for c in chunks], cfg.model, folder)
    seed_everything(cfg.trainer.seed)  # the RL run's randomness does not depend on the cache state
    return folder
