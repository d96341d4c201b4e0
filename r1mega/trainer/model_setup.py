"""The policy a run trains: its tokenizer, its initial weights (an r1mega model, an HF checkpoint or
the built-in base model), the model chunks with their optimizer and scheduler, and the frozen KL
reference model. Shared by the RL and SFT runs and by generation-only stages.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

import torch
from megatron.core.utils import get_model_config

from r1mega.checkpoint.hf_convert import load_hf_weights
from r1mega.checkpoint.mcore import check_model_matches, load_model
from r1mega.checkpoint.staging import expert_biases
from r1mega.config.schema import R1Config
from r1mega.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from r1mega.models.builder import build_model
from r1mega.platform.distributed import Runtime, barrier, rank
from r1mega.trainer.optimizer import build_optimizer
from r1mega.trainer.pretrain import ensure_base_model

BUILTIN_TOKENIZER = "tokenizer-tiny"


def tokenizer_source(cfg: R1Config, promised: Optional[Dict[Path, R1Config]] = None) -> Path:
    """data.tokenizer, else the HF checkpoint's or the r1mega model's, else the built-in tiny one's folder
    (which may not be built yet). `promised`: model folders that pipeline stages not yet run will
    export, with those stages' configs (such a model carries its stage's tokenizer)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.hf_path:
        return Path(cfg.model.hf_path)
    if cfg.model.mcore_path:
        folder = Path(cfg.model.mcore_path)
        if (folder / "tokenizer.json").is_file():
            return folder  # a model exported by an r1mega stage carries its tokenizer
        if promised and not folder.exists() and folder.resolve() in promised:
            return tokenizer_source(promised[folder.resolve()], promised)
    return builtin_tokenizer_dir(cfg.pretrain.cache_dir, cfg.model.vocab_size)


def builtin_tokenizer_dir(cache_dir: str, vocab_size: int) -> Path:
    return Path(cache_dir) / f"{BUILTIN_TOKENIZER}-{vocab_size}"


def tokenizer_path(cfg: R1Config) -> Path:
    """tokenizer_source's folder; the built-in tokenizer is built there the first time."""
    folder = tokenizer_source(cfg)
    if folder == builtin_tokenizer_dir(cfg.pretrain.cache_dir, cfg.model.vocab_size):
        if not (folder / "tokenizer.json").is_file() and rank() == 0:
            build_tiny_tokenizer(folder, vocab_size=cfg.model.vocab_size)
        barrier()
    return folder


def run_tokenizer(cfg: R1Config):
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size={cfg.model.vocab_size}")
    return tokenizer


def initial_weights(cfg: R1Config, runtime: Runtime, tokenizer) -> Optional[str]:
    """Where the policy starts: an r1mega checkpoint (e.g. a previous stage's model, so it wins over
    model.hf_path), the HF checkpoint, the built-in base model, or None."""
    if cfg.model.mcore_path or cfg.model.hf_path:
        return cfg.model.mcore_path or cfg.model.hf_path
    if cfg.pretrain.enabled:
        return str(ensure_base_model(cfg, runtime, tokenizer))
    return None


def load_weights(chunks, cfg: R1Config, source: Optional[str]) -> None:
    if source is None:
        return
    if source == cfg.model.hf_path and not cfg.model.mcore_path:
        load_hf_weights(chunks, cfg.model, source)
    else:
        check_model_matches(source, cfg.model)
        load_model(chunks, source)


def build_policy(cfg: R1Config, source: Optional[str], steps: Optional[int] = None):
    """Model chunks from `source`, their DDP wrappers, optimizer and a scheduler over `steps`
    (default trainer.steps)."""
    chunks = build_model(cfg.model, cfg.parallel)
    load_weights(chunks, cfg, source)
    exchange_shapes(chunks)
    ddp, optimizer, scheduler = build_optimizer(chunks, cfg.model, cfg.optimizer, steps or cfg.trainer.steps)
    return chunks, ddp, optimizer, scheduler


def build_kl_reference(cfg: R1Config, source: Optional[str], policy: list) -> Optional[list]:
    """The KL reference model: a frozen copy of the initial policy (none when kl_beta = 0)."""
    if cfg.algorithm.kl_beta == 0:
        return None
    # its log-probs never run MTP layers; its weights are the policy's, copied next
    ref = build_model(replace(cfg.model, mtp=None), cfg.parallel, initialize=False)
    copy_weights(policy, ref)
    exchange_shapes(ref)
    for chunk in ref:
        chunk.eval()
        chunk.requires_grad_(False)
    return ref


def copy_weights(src: list, dst: list) -> None:
    """dst's parameters := src's (same layout), and the routers' expert bias (DeepSeek-V3's, a buffer
    that routes as much as the weights do): the KL reference's start and R1's reference reset. src may
    hold more (the policy's MTP layers, which the reference is built without); dst nothing src lacks."""
    with torch.no_grad():
        for a, b in zip(src, dst):
            theirs = dict([*a.named_parameters(), *expert_biases(a)])
            for name, q in [*b.named_parameters(), *expert_biases(b)]:
                q.copy_(theirs[name])


def exchange_shapes(chunks) -> None:
    # Micro-batches differ in length: pipeline stages send each activation's shape first.
    get_model_config(chunks[0]).variable_seq_lengths = True
