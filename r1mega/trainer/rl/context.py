"""What the RL phases share: config, model, optimizer, engine, rewards, prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from r1mega.config.schema import R1Config
from r1mega.rollout.types import RolloutEngine, SamplingParams


@dataclass
class RLContext:
    cfg: R1Config
    tokenizer: Any
    chunks: List[torch.nn.Module]  # the policy's megatron chunks (unwrapped)
    ddp_chunks: List[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    ref_chunks: Optional[List[torch.nn.Module]]  # frozen reference; None when kl_beta = 0
    engine: RolloutEngine
    engine_shares_weights: bool  # the native engine decodes with the policy's own parameters
    rewards: Any  # RewardStack on the first rank of each replica group, else None
    reward_names: List[str]  # component names, in a fixed order on every rank
    sampler: Any  # PromptSampler over the train split, this data-parallel rank's share
    test_records: list
    sampling: SamplingParams
    train_state: Any = None  # TrainState when trainer and engine take turns on the GPUs (colocated SGLang)
    hf_plan: Any = None  # who sends which HF tensor in a weight sync (made at the first sync)
    weights_version: int = 0  # optimizer steps taken; the engine holds weights_version == synced_version
    synced_version: int = -1
    async_rollout: Any = None  # AsyncRollout under rollout.mode=async: workers generate, the engine only evaluates
    one_step_off: Any = None  # OneStepOff under rollout.mode=async with colocated engines
    teacher: Any = None  # Teacher under algorithm.opd: scores the student's tokens in its own parallel layout

    @property
    def temperature(self) -> float:
        """Temperature of the trainer's log-probs: the one the rollouts were sampled at."""
        return self.sampling.logprob_temperature

    def close(self) -> None:
        """Stop the engine (its servers, for SGLang), the rollout workers and the reward workers."""
        if self.async_rollout is not None:
            self.async_rollout.close()
        self.engine.shutdown()
        if self.rewards is not None:
            self.rewards.close()
