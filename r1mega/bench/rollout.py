"""Rollout alone: generated tokens/s against batch size, per engine and prompt set. Every row decodes
exactly bench.rollout.new_tokens tokens (EOS is not a stop here), random weights. Two prompt sets:
the task's prompts, and long-tailed lengths (lognormal, random tokens), where left padding to the
longest prompt would fill most of the prefill. The native engine reports the prefill's share of
generation time and the share of prefill positions that were padding, with its prefill in length
buckets (its default) and as one left-padded forward, timed alternately: the ratio is what the
buckets save. SGLang (where installed, on a GPU) also reports its weight sync: GB sent and GB/s. For partial
rollouts, the native engine also times a weight update halfway through the tokens with its KV
cache kept against computed again under the new weights (the largest batch of each prompt set)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Dict, List

import torch

from r1mega.bench.measure import median, peak_memory_mb, timed
from r1mega.bench.packing import long_tailed_lengths
from r1mega.bench.training import with_layout
from r1mega.checkpoint.hf_gather import make_plan, world_hf_tensors
from r1mega.config.bench_schema import LayoutConfig
from r1mega.config.schema import R1Config
from r1mega.models.builder import build_model
from r1mega.platform.distributed import running
from r1mega.platform.fp8 import token_multiple
from r1mega.platform.launch import spawn
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.sglang.launch import build_sglang_engine
from r1mega.rollout.types import SamplingParams
from r1mega.trainer.model_setup import run_tokenizer
from r1mega.trainer.rl.setup import load_records, tokenize_prompts


def run(cfg: R1Config) -> Dict:
    rows: List[Dict] = []
    partial: List[Dict] = []
    for engine in cfg.bench.rollout.engines:
        why = unavailable(engine)
        if why:
            rows.append({"engine": engine, "skipped": why})
            continue
        one = with_layout(cfg, LayoutConfig())  # one rank
        measured, updates = spawn(1, _rank, one, engine, timeout=3600.0)[0]
        rows += [{"engine": engine, **r} for r in measured]
        partial += updates
    return {"model": cfg.model.name, "new_tokens": cfg.bench.rollout.new_tokens, "rows": rows, "partial": partial}


def unavailable(engine: str) -> str:
    """Why an engine cannot be measured here ('' when it can)."""
    if engine == "native":
        return ""
    if engine == "sglang":
        if importlib.util.find_spec("sglang") is None:
            return "sglang is not installed"
        if not torch.cuda.is_available():
            return "SGLang needs a CUDA GPU"
        return ""
    return f"unknown engine {engine!r}"


def _rank(cfg: R1Config, kind: str) -> List[Dict[str, float]]:
    b = cfg.bench
    with running(cfg.parallel, cfg.trainer.seed):
        tokenizer = run_tokenizer(cfg)
        chunks = build_model(cfg.model, cfg.parallel)
        engine, note = (_native(cfg, chunks, tokenizer), "") if kind == "native" else _sglang(cfg, chunks, tokenizer)
        params = SamplingParams(temperature=1.0, max_new_tokens=b.rollout.new_tokens)
        rows, partial = [], []
        try:
            for name in b.rollout.prompt_sets:
                prompts = _prompts(cfg, tokenizer, name, max(b.rollout.batch_sizes))
                for size in b.rollout.batch_sizes:
                    rows.append({"prompts": name, "batch_size": size, **_measure(cfg, engine, prompts[:size], params),
                                 **peak_memory_mb(), "note": note})
                if kind == "native":
                    partial.append({"prompts": name, "batch_size": len(prompts),
                                    **_weight_update_midway(cfg, engine, chunks, prompts, params)})
        finally:
            engine.shutdown()
        return rows, partial


def _prompts(cfg: R1Config, tokenizer, name: str, count: int) -> List[List[int]]:
    if name == "task":
        task = [r.token_ids for r in tokenize_prompts(cfg, tokenizer, load_records(cfg)[0], "train")]
        return [task[i % len(task)] for i in range(count)]
    r = cfg.bench.rollout
    lengths = long_tailed_lengths(count, r.prompt_median, r.prompt_p99, cfg.model.max_position_embeddings
                                  - r.new_tokens, cfg.trainer.seed)
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    return [torch.randint(1, cfg.model.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _measure(cfg: R1Config, engine, batch: List[List[int]], params: SamplingParams) -> Dict[str, float]:
    """Median of the timed calls. The native engine alternates its length-bucketed prefill with one
    left-padded prefill (a forward costing more than any padding) and reports both, side by side."""
    native = isinstance(engine, NativeEngine)
    bucketed = engine.prefill_call_positions if native else 0
    stats = []

    def call(i: int):
        if native:
            engine.prefill_call_positions = bucketed if i % 2 else 1 << 62
        out = engine.generate(batch, params)
        stats.append(dict(getattr(engine, "last_stats", {})))
        return out

    every = 2 if native else 1
    runs = timed(call, every * cfg.bench.warmup, every * cfg.bench.repeats)
    stats = stats[every * cfg.bench.warmup:]
    generated = sum(len(r) for r in runs[-1][1].response_ids)
    row = {"prompt_tokens": sum(len(p) for p in batch), "generated_tokens": generated}
    for k, key in enumerate(("", "unbucketed_")[:every]):
        seconds = median([s for s, _ in runs[k::every]])
        row |= {f"{key}seconds": seconds, f"{key}tokens_per_s": generated / seconds}
        if native:
            row[f"{key}prefill_share"] = median([s["prefill_s"] / s["generate_s"] for s in stats[k::every]])
            row[f"{key}prefill_padding_share"] = 1.0 - stats[k]["prefill_tokens"] / stats[k]["prefill_positions"]
    if native:  # without bucketing (TE's attention, expert parallelism) both runs prefill alike
        engine.prefill_call_positions = bucketed
        row["bucketed_prefill"] = engine.bucketed_prefill
        row["bucketed_prefill_speedup"] = row["tokens_per_s"] / row["unbucketed_tokens_per_s"]
    return row


def _weight_update_midway(cfg: R1Config, engine: NativeEngine, chunks, batch: List[List[int]],
                          params: SamplingParams) -> Dict[str, float]:
    """A partial rollout's weight update halfway through the tokens (the same values copied in, so
    only the cost differs): the KV cache kept, against computed again under the new weights, timed
    alternately."""
    weights = [(p, p.detach().clone()) for c in chunks for p in c.parameters()]

    def call(i: int):
        engine.recompute_after_update = bool(i % 2)
        steps = []

        def update() -> bool:
            steps.append(1)
            if len(steps) != params.max_new_tokens // 2:
                return False
            with torch.no_grad():
                for p, new in weights:
                    p.copy_(new)
            return True

        engine.between_tokens = update
        return engine.generate(batch, params)

    try:
        runs = timed(call, 2 * cfg.bench.warmup, 2 * cfg.bench.repeats)
    finally:
        engine.between_tokens, engine.recompute_after_update = None, False
    keep, recompute = median([s for s, _ in runs[0::2]]), median([s for s, _ in runs[1::2]])
    return {"keep_s": keep, "recompute_s": recompute, "recompute_cost": recompute / keep}


def _native(cfg: R1Config, chunks, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = NativeEngine(chunks, eos_token_ids=[], pad_token_id=pad, max_batch_size=max(cfg.bench.rollout.batch_sizes),
                          seed=cfg.trainer.seed, row_multiple=token_multiple(cfg.model.fp8))
    engine.timed = True
    return engine


def _sglang(cfg: R1Config, chunks, tokenizer):
    """A one-GPU SGLang engine holding the model's weights, and a note on its (second) weight sync."""
    cfg = copy.deepcopy(cfg)
    cfg.rollout.engine, cfg.rollout.sglang.mode, cfg.rollout.sglang.tp = "sglang", "colocated", 1
    cfg.trainer.output_dir = str(Path(cfg.bench.output_dir) / "sglang-run")
    engine = build_sglang_engine(cfg, tokenizer)
    engine.ignore_eos = True
    plan = make_plan(chunks, cfg.model, decoder_only=True)
    for _ in range(2):  # the first sync warms up
        engine.sync_weights(world_hf_tensors(chunks, cfg.model, plan))
    s = engine.last_sync
    return engine, f"weight sync: {s['sync/gb']:.3f} GB in {s['sync/seconds']:.3f} s ({s['sync/gb_per_s']:.2f} GB/s)"
