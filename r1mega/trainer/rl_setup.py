"""Set-up of an RL run: tokenizer, prompts, initial weights, optimizer, reference, engine, rewards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import get_model_config

from r1mega.checkpoint.mcore import check_model_matches, load_model
from r1mega.checkpoint.staging import barrier
from r1mega.config.schema import R1Config
from r1mega.data.prompts import load_prompts
from r1mega.data.sampler import PromptSampler
from r1mega.data.tasks import make_task
from r1mega.data.templates import render_prompt
from r1mega.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from r1mega.models.builder import build_model
from r1mega.platform.distributed import Runtime
from r1mega.platform.fp8 import token_multiple
from r1mega.rewards.stack import RewardStack
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.types import SamplingParams
from r1mega.trainer.memory_turns import TrainState
from r1mega.trainer.optimizer import build_optimizer
from r1mega.trainer.rl_context import RLContext

log = logging.getLogger(__name__)

BUILTIN_TOKENIZER = "tokenizer-tiny"


def tokenizer_path(cfg: R1Config) -> Path:
    """data.tokenizer, else the HF checkpoint's or the r1mega model's, else the built-in tiny one (built once)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.hf_path:
        return Path(cfg.model.hf_path)
    if cfg.model.mcore_path and (Path(cfg.model.mcore_path) / "tokenizer.json").is_file():
        return Path(cfg.model.mcore_path)  # a model exported by an r1mega stage carries its tokenizer
    folder = Path(cfg.warmup.cache_dir) / f"{BUILTIN_TOKENIZER}-{cfg.model.vocab_size}"
    if not (folder / "tokenizer.json").is_file() and _is_first_rank():
        build_tiny_tokenizer(folder, vocab_size=cfg.model.vocab_size)
    barrier()
    return folder


def run_tokenizer(cfg: R1Config):
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size={cfg.model.vocab_size}")
    return tokenizer


def load_records(cfg: R1Config) -> Tuple[list, list]:
    """(train, held-out) prompt records of the configured data."""
    d = cfg.data
    if d.name == "files":
        train = load_prompts(d.train_path, on_bad_row=d.on_bad_row)
        test = load_prompts(d.test_path, on_bad_row=d.on_bad_row) if d.test_path else []
        return train, test
    knobs = dict(d.difficulty)
    return (make_task(d.name, "train", d.train_size, d.seed, **knobs),
            make_task(d.name, "test", d.test_size, d.seed, **knobs))


def tokenize_prompts(cfg: R1Config, tokenizer, records: list, split: str) -> Tuple[list, Dict[int, List[int]]]:
    """Render and tokenize prompts; those over data.max_prompt_tokens are dropped with a warning."""
    texts = [render_prompt(r, tokenizer, cfg.data.template) for r in records]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # no held-out file: none
    keep, table = [], {}
    for record, seq in zip(records, ids):
        if 0 < len(seq) <= cfg.data.max_prompt_tokens:
            keep.append(record)
            table[id(record)] = list(seq)  # by object: ids of different files may coincide
    if len(keep) < len(records) and _is_first_rank():
        log.warning("%s split: %d of %d prompts are empty or longer than data.max_prompt_tokens=%d and are skipped",
                    split, len(records) - len(keep), len(records), cfg.data.max_prompt_tokens)
    if split == "train" and not keep:
        raise ValueError(f"no train prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return keep, table


def initial_weights(cfg: R1Config, runtime: Runtime, tokenizer) -> Optional[str]:
    """Where the policy starts: an r1mega checkpoint (e.g. a previous stage's model, so it wins over
    model.hf_path), the HF checkpoint, the built-in base model, or None."""
    if cfg.model.mcore_path or cfg.model.hf_path:
        return cfg.model.mcore_path or cfg.model.hf_path
    if cfg.warmup.enabled:
        from r1mega.trainer.warmup import ensure_base_model

        return str(ensure_base_model(cfg, runtime, tokenizer))
    return None


def load_weights(chunks, cfg: R1Config, source: Optional[str]) -> None:
    if source is None:
        return
    if source == cfg.model.hf_path and not cfg.model.mcore_path:
        from r1mega.checkpoint.hf_convert import load_hf_weights

        load_hf_weights(chunks, cfg.model, source)
    else:
        check_model_matches(source, cfg.model)
        load_model(chunks, source)


def build_policy(cfg: R1Config, source: Optional[str], steps: Optional[int] = None):
    """Model chunks from `source`, their DDP wrappers, optimizer and a scheduler over `steps`
    (default trainer.steps)."""
    chunks = build_model(cfg.model, cfg.parallel)
    load_weights(chunks, cfg, source)
    _exchange_shapes(chunks)
    ddp, optimizer, scheduler = build_optimizer(chunks, cfg.model, cfg.optimizer, steps or cfg.trainer.steps)
    return chunks, ddp, optimizer, scheduler


def build_reference(cfg: R1Config, source: Optional[str], policy: list) -> Optional[list]:
    """A frozen copy of the initial policy for the KL term (none when kl_beta = 0)."""
    if cfg.algorithm.kl_beta == 0:
        return None
    ref = build_model(cfg.model, cfg.parallel)
    copy_weights(policy, ref)
    _exchange_shapes(ref)
    for chunk in ref:
        chunk.eval()
        chunk.requires_grad_(False)
    return ref


def copy_weights(src: list, dst: list) -> None:
    """dst's parameters := src's (same layout): the reference reset of R1."""
    with torch.no_grad():
        for a, b in zip(src, dst):
            for (name, p), (name_b, q) in zip(a.named_parameters(), b.named_parameters()):
                assert name == name_b, (name, name_b)
                q.copy_(p)


def _exchange_shapes(chunks) -> None:
    # Micro-batches differ in length: pipeline stages send each activation's shape first.
    get_model_config(chunks[0]).variable_seq_lengths = True


def build_rewards(cfg: R1Config) -> Tuple[Optional[RewardStack], List[str]]:
    """The reward stack on the first rank of each model-parallel group; component names everywhere.

    'accuracy' is always scored (weight 0 if not configured) so evaluation can report it.
    """
    r = cfg.reward
    components = dict(r.components)
    components.setdefault("accuracy", 0.0)
    names = list(components) + list(r.custom)
    stack = None
    if dist.get_rank() == dist.get_global_rank(ps.get_model_parallel_group(), 0):
        stack = RewardStack(components=components, custom=dict(r.custom), timeout_s=r.timeout_s,
                            num_workers=r.num_workers, language=r.language,
                            overlong_max_tokens=r.overlong_max_tokens or cfg.rollout.max_new_tokens,
                            overlong_cache_tokens=r.overlong_cache_tokens)
    return stack, names


def sampling_params(cfg: R1Config, tokenizer) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop=tuple(r.stop))


def build_engine(cfg: R1Config, chunks, tokenizer):
    if cfg.rollout.engine == "sglang":
        from r1mega.rollout.sglang.launch import build_sglang_engine

        return build_sglang_engine(cfg, tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return NativeEngine(chunks, eos, pad, detokenize=tokenizer.decode, max_batch_size=cfg.rollout.max_batch_size,
                        seed=cfg.trainer.seed * 1000 + ps.get_data_parallel_rank(),
                        row_multiple=token_multiple(cfg.model.fp8))


def setup(cfg: R1Config, runtime: Runtime) -> RLContext:
    tokenizer = run_tokenizer(cfg)
    train, test = load_records(cfg)
    train, table = tokenize_prompts(cfg, tokenizer, train, "train")
    test, test_table = tokenize_prompts(cfg, tokenizer, test, "test")
    table.update(test_table)
    source = initial_weights(cfg, runtime, tokenizer)
    separate = cfg.rollout.engine != "native"  # the engine keeps its own copy of the weights
    # such an engine starts before the policy takes memory: SGLang sizes its KV cache from what is free
    engine = build_engine(cfg, None, tokenizer) if separate else None
    chunks, ddp, optimizer, scheduler = build_policy(cfg, source)
    engine = engine or build_engine(cfg, chunks, tokenizer)
    rewards, names = build_rewards(cfg)
    sampler = PromptSampler(train, cfg.data.prompts_per_step, cfg.data.seed, ps.get_data_parallel_rank(),
                            ps.get_data_parallel_world_size())
    return RLContext(cfg=cfg, tokenizer=tokenizer, chunks=chunks, ddp_chunks=ddp, optimizer=optimizer,
                     scheduler=scheduler, ref_chunks=build_reference(cfg, source, chunks), engine=engine,
                     engine_shares_weights=not separate, rewards=rewards, reward_names=names, sampler=sampler,
                     test_records=test, sampling=sampling_params(cfg, tokenizer), prompt_tokens=table,
                     train_state=train_state(cfg, ddp, optimizer))


def train_state(cfg: R1Config, ddp, optimizer) -> Optional[TrainState]:
    """Offload and reload of the trainer's memory, when it takes turns with a colocated engine."""
    if cfg.rollout.engine == "native":
        return None
    from r1mega.rollout.sglang.launch import memory_saver

    g = cfg.rollout.sglang
    return TrainState(ddp, optimizer, g.offload_optimizer, g.offload_params) if memory_saver(cfg) else None


def _is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
