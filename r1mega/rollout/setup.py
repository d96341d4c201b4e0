"""What a run's config makes of the rollout side: sampling settings, the native engine, the reward
stack, and rollouts turned into reward inputs. Shared by the trainer (synchronous rollouts,
evaluation) and the asynchronous rollout workers, which generate and score on their own."""

from __future__ import annotations

from dataclasses import asdict

from typing import Callable, List, Sequence, Tuple

from r1mega.config.schema import R1Config
from r1mega.models.routing_replay import install, moe_layer_numbers
from r1mega.platform.fp8 import token_multiple
from r1mega.rewards.stack import RewardInput, RewardStack
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.types import Rollouts, SamplingParams


def sampling_params(cfg: R1Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop=tuple(r.stop))


def native_engine(cfg: R1Config, chunks, tokenizer, seed: int = 0) -> NativeEngine:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return NativeEngine(chunks, eos, pad, detokenize=tokenizer.decode, max_batch_size=cfg.rollout.max_batch_size,
                        seed=seed, row_multiple=token_multiple(cfg.model.fp8))


def record_routing(engine, chunks) -> None:
    """The engine (native or SGLang) records every fed token's experts with its rows (MoE routing replay,
    algorithm.routing_replay=rollout). The native engine's recording reads the routers' replay objects,
    installed here on `chunks` (the policy's, or a rollout worker's copy)."""
    install(chunks)
    config = chunks[0].config
    engine.record_routing = True
    # SGLang returns every decoder layer's experts (dense ones 0): the engine keeps the MoE layers'
    engine.routing_num_layers = config.num_layers
    engine.routing_layers = [n - 1 for n in moe_layer_numbers(config)]
    engine.routing_topk = config.moe_router_topk


def reward_inputs(records: Sequence, rollouts: Rollouts, decode: Callable[..., str]) -> List[RewardInput]:
    """One RewardInput per row: the decoded response and its prompt record's ground truth."""
    return [reward_input(rec, ids, reason, decode)
            for rec, ids, reason in zip(records, rollouts.response_ids, rollouts.finish_reasons)]


def reward_input(record, response_ids: List[int], reason: str, decode: Callable[..., str]) -> RewardInput:
    return RewardInput(response=decode(response_ids, skip_special_tokens=True), answer=record.answer,
                       data_source=record.data_source, metadata=record.metadata, response_tokens=len(response_ids),
                       truncated=reason == "length")


def _components(cfg: R1Config) -> dict:
    # 'accuracy' is always scored (weight 0 if not configured) so evaluation can report it
    components = dict(cfg.reward.components)
    components.setdefault("accuracy", 0.0)
    return components


def reward_names(cfg: R1Config) -> List[str]:
    """Component names in a fixed order: the built-in ones, then the custom ones."""
    return list(_components(cfg)) + list(cfg.reward.custom)


def make_reward_stack(cfg: R1Config) -> Tuple[RewardStack, List[str]]:
    r = cfg.reward
    stack = RewardStack(components=_components(cfg), custom=dict(r.custom), timeout_s=r.timeout_s,
                        num_workers=r.num_workers, language=r.language,
                        overlong_max_tokens=r.overlong_max_tokens or cfg.rollout.max_new_tokens,
                        overlong_cache_tokens=r.overlong_cache_tokens,
                        code=asdict(r.code) if r.code is not None else None)
    return stack, reward_names(cfg)
