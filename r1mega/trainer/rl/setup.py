"""Set-up of an RL run: prompts tokenized once, the policy and its KL reference, the rollout
engine, the reward stack, the prompt sampler; all of it in one RLContext."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import List, Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state as ps

from r1mega.config.rl_rules import one_step_off_policy
from r1mega.config.schema import R1Config
from r1mega.data.prompts import load_prompts
from r1mega.data.sampler import PromptSampler
from r1mega.data.tasks import make_task
from r1mega.rewards.code import is_code_row
from r1mega.data.templates import rendered
from r1mega.platform.distributed import Runtime, rank, replica_group
from r1mega.models.mtp import detach_from_trunk
from r1mega.models.specs import resolve_backend
from r1mega.rewards.stack import RewardStack
from r1mega.rollout.setup import make_reward_stack, native_engine, reward_names, sampling_params
from r1mega.rollout.sglang.launch import build_sglang_engine, memory_saver
from r1mega.trainer.model_setup import (build_kl_reference, build_policy, initial_weights, run_tokenizer,
                                        tokenizer_path)
from r1mega.trainer.rl.async_rollout import AsyncRollout
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.one_step_off import OneStepOff
from r1mega.trainer.rl.teacher import make_teacher
from r1mega.trainer.rl.offload import TrainState
from r1mega.trainer.rl import routing

log = logging.getLogger(__name__)

def load_records(cfg: R1Config) -> Tuple[list, list]:
    """(train, held-out) prompt records of the configured data."""
    d = cfg.data
    if d.name == "files":
        train = load_prompts(d.train_path, on_bad_row=d.on_bad_row, limits=d.limits)
        test = load_prompts(d.test_path, on_bad_row=d.on_bad_row, limits=d.limits) if d.test_path else []
        return train, test
    knobs = dict(d.difficulty)
    return (make_task(d.name, "train", d.train_size, d.seed, **knobs),
            make_task(d.name, "test", d.test_size, d.seed, **knobs))


def prompts(cfg: R1Config, tokenizer) -> Tuple[list, list]:
    """(train, held-out) prompt records of the configured data, tokenized."""
    train, test = load_records(cfg)
    if cfg.reward.code is None:
        code_row = next((r for r in train + test if is_code_row(r.metadata)), None)
        if code_row is not None:
            raise ValueError(f"{code_row.where or code_row.prompt_id}: a code row (its metadata has tests) needs "
                             f"reward.code to run its programs: add reward=code")
    return tokenize_prompts(cfg, tokenizer, train, "train"), tokenize_prompts(cfg, tokenizer, test, "test")


def tokenize_prompts(cfg: R1Config, tokenizer, records: list, split: str) -> list:
    """The records with their rendered prompt's token_ids; those over data.max_prompt_tokens are
    dropped with a warning, and those the template refuses (a chat template's own checks) are bad rows
    (data.on_bad_row), named by file and line."""
    records, texts = rendered(records, tokenizer, cfg.data.template, cfg.data.on_bad_row)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # no held-out file: none
    keep = [replace(r, token_ids=list(seq)) for r, seq in zip(records, ids)
            if 0 < len(seq) <= cfg.data.max_prompt_tokens]
    if len(keep) < len(records) and rank() == 0:
        log.warning("%s split: %d of %d prompts are empty or longer than data.max_prompt_tokens=%d and are skipped",
                    split, len(records) - len(keep), len(records), cfg.data.max_prompt_tokens)
    if split == "train" and not keep:
        raise ValueError(f"no train prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    return keep


def build_rewards(cfg: R1Config) -> Tuple[Optional[RewardStack], List[str]]:
    """The reward stack on the first rank of each replica group (the ranks holding one data-parallel
    rank's rows); component names everywhere."""
    if dist.get_rank() == dist.get_global_rank(replica_group(), 0):
        return make_reward_stack(cfg)
    return None, reward_names(cfg)


def build_engine(cfg: R1Config, chunks, tokenizer):
    """The engine of synchronous rollouts and evaluation. With rollout workers evaluation decodes with the
    policy's own parameters (the native engine): the workers' engines may lag behind them."""
    if cfg.rollout.engine == "sglang" and chunks is None:
        return build_sglang_engine(cfg, tokenizer)
    return native_engine(cfg, chunks, tokenizer, seed=cfg.trainer.seed * 1000 + ps.get_data_parallel_rank())


def check_whole_sequences(cfg: R1Config) -> None:
    """Under context parallelism only the trainer's THD packs are split. Transformer Engine's attention
    splits every input over the context-parallel group, so the native engine, which runs whole
    sequences through the policy, cannot run on it."""
    native = cfg.rollout.engine == "native" or rollout_workers(cfg)  # their runs evaluate on the native engine
    if cfg.parallel.cp > 1 and native and resolve_backend(cfg.model.attention_backend) == "te":
        raise ValueError("parallel.cp > 1 with Transformer Engine attention: the native engine (rollout.engine="
                         "native, and evaluation under rollout.mode=async) runs whole sequences, which TE splits "
                         "over the context-parallel ranks; use rollout.engine=sglang with rollout.mode=sync, or "
                         "model.attention_backend=sdpa")


def setup(cfg: R1Config, runtime: Runtime) -> RLContext:
    check_whole_sequences(cfg)
    tokenizer = run_tokenizer(cfg)
    train, test = prompts(cfg, tokenizer)
    source = initial_weights(cfg, runtime, tokenizer)
    # the teacher takes its memory before a separate engine sizes its KV cache from what is free
    teacher = make_teacher(cfg) if cfg.algorithm.opd is not None else None
    separate = cfg.rollout.engine != "native"  # the engine keeps its own copy of the weights
    # such an engine starts before the policy takes memory: SGLang sizes its KV cache from what is free
    engine = build_engine(cfg, None, tokenizer) if separate else None
    chunks, ddp, optimizer, scheduler = build_policy(cfg, source)
    detach_from_trunk(chunks)  # the MTP layers learn from the samples; no policy weight gets their gradient
    sglang = None
    if separate and rollout_workers(cfg):  # the async controller drives the SGLang engines
        sglang, engine, separate = engine, None, False
    engine = engine or build_engine(cfg, chunks, tokenizer)
    # routing replay: the engine whose rows train records their experts (rollout workers record on their own)
    routing.enable(cfg, chunks, sglang if sglang is not None else None if rollout_workers(cfg) else engine)
    rewards, names = build_rewards(cfg)
    sampler = PromptSampler(train, cfg.data.prompts_per_step, cfg.data.seed, ps.get_data_parallel_rank(),
                            ps.get_data_parallel_world_size())
    if cfg.rollout.mode == "async":
        warn_if_uncorrected(cfg)
    if cfg.algorithm.opd is not None and cfg.rollout.temperature != 1.0 and dist.get_rank() == 0:
        log.warning("rollout.temperature=%g with algorithm=opd: the student's log-probs are of its tempered sampling "
                    "distribution and the teacher's of its own (temperature 1), so the student's sampling learns "
                    "the teacher's untempered distribution", cfg.rollout.temperature)
    workers = AsyncRollout(cfg, chunks, train, tokenizer_path(cfg), sglang) if rollout_workers(cfg) else None
    sampling = sampling_params(cfg)
    ahead = None
    if one_step_off_policy(cfg):
        ahead = OneStepOff(engine, sampler, sampling, cfg.algorithm.group_size, cfg.trainer.steps)
    return RLContext(cfg=cfg, tokenizer=tokenizer, chunks=chunks, ddp_chunks=ddp, optimizer=optimizer,
                     scheduler=scheduler, ref_chunks=build_kl_reference(cfg, source, chunks), engine=engine,
                     engine_shares_weights=not separate, rewards=rewards, reward_names=names, sampler=sampler,
                     test_records=test, sampling=sampling, train_state=train_state(cfg, ddp, optimizer),
                     async_rollout=workers, one_step_off=ahead, teacher=teacher)


def rollout_workers(cfg: R1Config) -> bool:
    """Whether rollout workers of their own generate (rollout.mode=async on the native engine or on
    disaggregated SGLang engines); colocated engines generate one step ahead instead (OneStepOff)."""
    return cfg.rollout.mode == "async" and not one_step_off_policy(cfg)


def warn_if_uncorrected(cfg: R1Config) -> None:
    """Off-policy samples without a correction train against the trainer's own log-probs."""
    a = cfg.algorithm
    if dist.get_rank() == 0 and a.max_staleness and a.correction.weight is None and a.correction.reject is None \
            and not a.use_rollout_logprobs:
        # measured on the built-in task at staleness 1: 13 points of held-out accuracy lost without a
        # correction, 1 with correction=decoupled (README, Performance)
        log.warning("algorithm.max_staleness=%d without algorithm.correction: the PPO ratio is taken against "
                    "the trainer's own log-probs, so samples of older policies go uncorrected; consider "
                    "correction=decoupled", a.max_staleness)


def train_state(cfg: R1Config, ddp, optimizer) -> Optional[TrainState]:
    """Offload and reload of the trainer's memory, when it takes turns with a colocated engine."""
    if cfg.rollout.engine == "native":
        return None
    g = cfg.rollout.sglang
    return TrainState(ddp, optimizer, g.offload_optimizer, g.offload_params) if memory_saver(cfg) else None

