"""The update phase packed against padded: one optimizer step over the same rows, as THD packs
(trainer.pack=true) and as right-padded micro-batches (false), timed alternately on one model.

Two row sets: long-tailed response lengths (lognormal with the configured median and 99th
percentile, as reasoning traces are), and the built-in task's prompts with their worked solutions
(the format its RL responses take). Tokens/s counts the rows' real tokens, so both layouts do the
same useful work and the ratio is the speed-up.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Dict, List

import numpy as np
import torch

from r1mega.bench.measure import median, timed
from r1mega.config.schema import R1Config
from r1mega.data.corpus import worked_response
from r1mega.data.tasks import make_task
from r1mega.data.templates import render_prompt
from r1mega.platform.distributed import dp_sum, running
from r1mega.platform.launch import spawn
from r1mega.platform.logs import setup_logging
from r1mega.trainer.forward_backward import train_step
from r1mega.trainer.model_setup import build_policy, run_tokenizer
from r1mega.trainer.rl.batch import StepBatch, layout_stats, micro_batches
from r1mega.trainer.rl.loss import LossSettings, policy_loss

Z99 = 2.3263  # the standard normal's 99th percentile


def run(cfg: R1Config) -> Dict:
    cfg = copy.deepcopy(cfg)
    cfg.pretrain.enabled = False  # timing only: random weights
    return spawn(1, _rank, cfg, timeout=3600.0)[0]


def long_tailed_lengths(n: int, median_len: int, p99: int, longest: int, seed: int) -> List[int]:
    """n lognormal lengths with the given median and 99th percentile, within [1, longest]."""
    sigma = math.log(p99 / median_len) / Z99
    draws = np.random.default_rng(seed).lognormal(math.log(median_len), sigma, n)
    return [int(min(max(round(x), 1), longest)) for x in draws]


def long_tailed_batch(cfg: R1Config) -> StepBatch:
    p = cfg.bench.packing
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    lengths = long_tailed_lengths(p.rows, p.median_response, p.p99_response, p.longest_response, cfg.trainer.seed)
    prompts = [torch.randint(1, cfg.model.vocab_size, (p.prompt_tokens,), generator=g) for _ in lengths]
    responses = [torch.randint(1, cfg.model.vocab_size, (n,), generator=g) for n in lengths]
    return _batch([q.tolist() for q in prompts], [r.tolist() for r in responses], g)


def task_batch(cfg: R1Config) -> StepBatch:
    """The built-in task's training prompts, each with a worked solution as its response."""
    p, tokenizer = cfg.bench.packing, run_tokenizer(cfg)
    records = make_task(cfg.data.name, "train", p.rows, cfg.data.seed, **dict(cfg.data.difficulty))
    rng = np.random.default_rng(cfg.trainer.seed)
    prompts = [tokenizer(render_prompt(r, tokenizer, cfg.data.template), add_special_tokens=False)["input_ids"]
               for r in records]
    responses = [tokenizer(worked_response(r, True, rng), add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id] for r in records]
    return _batch(prompts, responses, torch.Generator().manual_seed(cfg.trainer.seed))


def _batch(prompts: List[List[int]], responses: List[List[int]], g: torch.Generator) -> StepBatch:
    tokens = [torch.tensor(q + r) for q, r in zip(prompts, responses)]
    logp = [-torch.rand(len(r), generator=g) for r in responses]
    batch = StepBatch(tokens, [len(q) for q in prompts], torch.randn(len(prompts), generator=g), logp)
    batch.ref_logp = [lp - 0.1 for lp in logp]
    return batch


def _rank(cfg: R1Config) -> Dict:
    setup_logging()
    b = cfg.bench
    with running(cfg.parallel, cfg.trainer.seed):
        steps = 2 * (b.warmup + b.repeats) * 2
        _, ddp, optimizer, scheduler = build_policy(cfg, None, steps=steps)
        sets = {"long_tailed": long_tailed_batch}
        if cfg.data.name != "files":  # a built-in task has worked solutions
            sets["task"] = task_batch
        return {"model": cfg.model.name, "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
                "median_response": b.packing.median_response, "p99_response": b.packing.p99_response,
                "sets": {name: compare(cfg, make(cfg), ddp, optimizer, scheduler) for name, make in sets.items()}}


def compare(cfg: R1Config, batch: StepBatch, ddp, optimizer, scheduler) -> Dict:
    """The packed and the padded update over `batch`, alternating, each timed b.repeats times."""
    rows = list(range(len(batch)))
    tokens, seqs = dp_sum([batch.response_tokens(rows), len(rows)])
    settings = LossSettings(cfg.algorithm, cfg.rollout.max_new_tokens, 1.0, tokens, seqs)
    layouts = {}
    for pack in (True, False):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.trainer.pack = pack
        layouts["packed" if pack else "padded"] = micro_batches(run_cfg, batch, rows)
    order = list(layouts)

    def update(i: int) -> None:
        micro = layouts[order[(i - 1) % 2]]
        train_step(ddp, optimizer, scheduler, micro, partial(policy_loss, s=settings, scale=float(len(micro))))

    runs = timed(update, 2 * cfg.bench.warmup, 2 * cfg.bench.repeats)
    real = float(sum(batch.model_lengths()))
    out: Dict = {"rows": len(batch), "tokens": real,
                 "response_median": float(np.median([len(t) - n for t, n in zip(batch.tokens, batch.prompt_lens)])),
                 "response_max": float(max(len(t) - n for t, n in zip(batch.tokens, batch.prompt_lens)))}
    for k, name in enumerate(order):
        seconds = median([s for s, _ in runs[k::2]])
        stats = layout_stats(batch, layouts[name])
        out[name] = {"micro_batches": len(layouts[name]), "update_s": seconds, "tokens_per_s": real / seconds,
                     "padding_share": 1.0 - stats["real"] / stats["positions"]}
    out["speedup"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    return out
