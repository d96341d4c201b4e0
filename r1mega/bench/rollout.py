"""Rollout alone: generated tokens/s against batch size, per engine. Every row decodes exactly
bench.rollout.new_tokens tokens (EOS is not a stop here), from the task's prompts, random weights.
SGLang (where installed, on a GPU) also reports its weight sync: GB sent and GB/s."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Dict, List

import torch

from r1mega.bench.measure import median, peak_memory_mb, timed
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
    for engine in cfg.bench.rollout.engines:
        why = unavailable(engine)
        if why:
            rows.append({"engine": engine, "skipped": why})
            continue
        one = with_layout(cfg, LayoutConfig())  # one rank
        rows += [{"engine": engine, **r} for r in spawn(1, _rank, one, engine, timeout=3600.0)[0]]
    return {"model": cfg.model.name, "new_tokens": cfg.bench.rollout.new_tokens, "rows": rows}


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
        prompts = [r.token_ids for r in tokenize_prompts(cfg, tokenizer, load_records(cfg)[0], "train")]
        chunks = build_model(cfg.model, cfg.parallel)
        engine, note = (_native(cfg, chunks, tokenizer), "") if kind == "native" else _sglang(cfg, chunks, tokenizer)
        params = SamplingParams(temperature=1.0, max_new_tokens=b.rollout.new_tokens)
        rows = []
        try:
            for size in b.rollout.batch_sizes:
                batch = [prompts[i % len(prompts)] for i in range(size)]
                runs = timed(lambda _: engine.generate(batch, params), b.warmup, b.repeats)
                generated = sum(len(r) for r in runs[-1][1].response_ids)
                seconds = median([s for s, _ in runs])
                rows.append({"batch_size": size, "generated_tokens": generated, "seconds": seconds,
                             "tokens_per_s": generated / seconds, **peak_memory_mb(), "note": note})
        finally:
            engine.shutdown()
        return rows


def _native(cfg: R1Config, chunks, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return NativeEngine(chunks, eos_token_ids=[], pad_token_id=pad, max_batch_size=max(cfg.bench.rollout.batch_sizes),
                        seed=cfg.trainer.seed, row_multiple=token_multiple(cfg.model.fp8))


def _sglang(cfg: R1Config, chunks, tokenizer):
    """A one-GPU SGLang engine holding the model's weights, and a note on its (second) weight sync."""
    cfg = copy.deepcopy(cfg)
    cfg.rollout.engine, cfg.rollout.sglang.mode, cfg.rollout.sglang.tp = "sglang", "colocated", 1
    cfg.trainer.output_dir = str(Path(cfg.bench.output_dir) / "sglang-run")
    engine = build_sglang_engine(cfg, tokenizer)
    engine.ignore_eos = True
    plan = make_plan(chunks, cfg.model)
    for _ in range(2):  # the first sync warms up
        engine.sync_weights(world_hf_tensors(chunks, cfg.model, plan))
    s = engine.last_sync
    return engine, f"weight sync: {s['sync/gb']:.3f} GB in {s['sync/seconds']:.3f} s ({s['sync/gb_per_s']:.2f} GB/s)"
