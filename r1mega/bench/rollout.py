"""Rollout alone: generated tokens/s against batch size, per engine. Every row decodes exactly
bench.rollout.new_tokens tokens (EOS is not a stop here), from the task's prompts, random weights."""

from __future__ import annotations

import importlib.util
from typing import Dict, List

from r1mega.bench.measure import median, peak_memory_mb, timed
from r1mega.bench.training import with_layout
from r1mega.config.bench_schema import LayoutConfig
from r1mega.config.schema import R1Config
from r1mega.platform.launch import spawn


def run(cfg: R1Config) -> Dict:
    rows: List[Dict] = []
    for engine in cfg.bench.rollout.engines:
        why = unavailable(engine)
        if why:
            rows.append({"engine": engine, "skipped": why})
            continue
        one = with_layout(cfg, LayoutConfig())  # one rank
        rows += [{"engine": engine, **r} for r in spawn(1, _rank, one, timeout=3600.0)[0]]
    return {"model": cfg.model.name, "new_tokens": cfg.bench.rollout.new_tokens, "rows": rows}


def unavailable(engine: str) -> str:
    """Why an engine cannot be measured here ('' when it can)."""
    if engine == "native":
        return ""
    if engine == "sglang":
        if importlib.util.find_spec("sglang") is None:
            return "sglang is not installed"
        return "r1mega has no sglang rollout engine in this build"
    return f"unknown engine {engine!r}"


def _rank(cfg: R1Config) -> List[Dict[str, float]]:
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import running
    from r1mega.rollout.native import NativeEngine
    from r1mega.rollout.types import SamplingParams
    from r1mega.trainer.rl_setup import load_records, run_tokenizer, tokenize_prompts

    b = cfg.bench
    with running(cfg.parallel, cfg.trainer.seed):
        tokenizer = run_tokenizer(cfg)
        records, table = tokenize_prompts(cfg, tokenizer, load_records(cfg)[0], "train")
        prompts = [table[id(r)] for r in records]
        chunks = build_model(cfg.model, cfg.parallel)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        engine = NativeEngine(chunks, eos_token_ids=[], pad_token_id=pad, max_batch_size=max(b.rollout.batch_sizes),
                              seed=cfg.trainer.seed)
        params = SamplingParams(temperature=1.0, max_new_tokens=b.rollout.new_tokens)
        rows = []
        for size in b.rollout.batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(size)]
            runs = timed(lambda _: engine.generate(batch, params), b.warmup, b.repeats)
            generated = sum(len(r) for r in runs[-1][1].response_ids)
            seconds = median([s for s, _ in runs])
            rows.append({"batch_size": size, "generated_tokens": generated, "seconds": seconds,
                         "tokens_per_s": generated / seconds, **peak_memory_mb()})
        return rows
