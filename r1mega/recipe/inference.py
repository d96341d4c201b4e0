"""A model for generation only (evaluation, rejection sampling, a teacher writing traces).

The same pieces as an RL run (tokenizer, prompts, weights, native engine, reward stack) with
no optimizer: an RLContext whose training fields are empty, so evaluation code is shared.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from r1mega.config.schema import R1Config
from r1mega.models.builder import build_model
from r1mega.platform.distributed import Runtime
from r1mega.rollout.setup import sampling_params
from r1mega.trainer.model_setup import initial_weights, load_weights, run_tokenizer
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.offload import rollout_turn
from r1mega.trainer.rl.setup import build_engine, build_rewards, prompts


def inference_context(cfg: R1Config, runtime: Runtime, components: Optional[Dict[str, float]] = None
                      ) -> Tuple[RLContext, List]:
    """(context, train prompts): the model of cfg (model.mcore_path / hf_path / the built-in base),
    engine, rewards and held-out prompts in the context.

    `components`: the reward components to score (default: the configured ones).
    """
    if components is not None:
        cfg.reward.components = dict(components)
    tokenizer = run_tokenizer(cfg)
    train, test = prompts(cfg, tokenizer)
    chunks = build_model(replace(cfg.model, mtp=None), cfg.parallel)  # generation never runs MTP layers
    load_weights(chunks, cfg, initial_weights(cfg, runtime, tokenizer))
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    rewards, names = build_rewards(cfg)
    ctx = RLContext(cfg=cfg, tokenizer=tokenizer, chunks=chunks, ddp_chunks=chunks, optimizer=None, scheduler=None,
                    ref_chunks=None, engine=build_engine(cfg, chunks, tokenizer),
                    engine_shares_weights=cfg.rollout.engine == "native", rewards=rewards, reward_names=names,
                    sampler=None, test_records=test, sampling=sampling_params(cfg))
    rollout_turn(ctx)  # an engine with its own copy of the weights gets them once
    return ctx, train

