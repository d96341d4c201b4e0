"""Training alone: forward + backward + optimizer step tokens/s of model presets under parallel
layouts, on random tokens. Data-parallel ranks each keep their micro-batches (weak scaling), so
tokens/s against DP ranks is the scaling curve; TP=2 against TP=1 trains the same batch."""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List

import torch
from megatron.core import parallel_state as ps

from r1mega.bench.flops import device_peak_tflops, mfu, training_flops_per_token
from r1mega.bench.measure import max_over_ranks, median, peak_memory_mb, timed
from r1mega.config.bench_schema import LayoutConfig
from r1mega.config.loader import compose_config, to_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import ConfigError, validate
from r1mega.platform.distributed import current_device, running
from r1mega.platform.launch import spawn
from r1mega.trainer.model_setup import build_policy
from r1mega.trainer.pretrain import train_step


def with_layout(cfg: R1Config, layout: LayoutConfig) -> R1Config:
    """A copy of cfg run under the layout's parallel sizes, its ranks spawned here."""
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.pp, p.ep, p.vpp, p.pipeline_layout = layout.tp, layout.pp, layout.ep, None, None
    p.nproc = layout.tp * layout.pp * layout.dp
    # megatron's MoE layer needs sequence parallelism under TP
    p.sequence_parallel = layout.tp > 1 and (p.sequence_parallel or out.model.moe is not None)
    return out


def run(cfg: R1Config) -> Dict:
    b = cfg.bench.train
    rows: List[Dict] = []
    for name in b.models:
        model = to_config(compose_config([f"model={name}"])).model
        model.dtype = b.dtype or cfg.model.dtype
        model.attention_backend = cfg.model.attention_backend
        for layout in b.layouts:
            row = {"model": name, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep}
            run_cfg = with_layout(dataclasses.replace(cfg, model=model), layout)
            try:
                validate(run_cfg, run_cfg.parallel.nproc)
            except ConfigError as e:
                rows.append({**row, "skipped": str(e)})
                continue
            rows.append({**row, **spawn(run_cfg.parallel.nproc, _rank, run_cfg, timeout=3600.0)[0]})
    return {"seq_length": b.seq_length, "micro_batch_size": b.micro_batch_size, "micro_batches": b.micro_batches,
            "dtype": b.dtype or cfg.model.dtype, "rows": rows}


def _rank(cfg: R1Config) -> Dict[str, float]:
    b = cfg.bench
    with running(cfg.parallel, cfg.trainer.seed) as runtime:
        _, ddp, optimizer, scheduler = build_policy(cfg, None, steps=b.warmup + b.repeats)
        # Same tokens on the ranks of a model-parallel group, different ones across data-parallel ranks.
        g = torch.Generator().manual_seed(cfg.trainer.seed + ps.get_data_parallel_rank())
        shape = (b.train.micro_batch_size, b.train.seq_length + 1)
        batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(b.train.micro_batches)]
        runs = timed(lambda _: train_step(ddp, optimizer, scheduler, batches, b.train.seq_length,
                                          b.train.micro_batch_size), b.warmup, b.repeats)
        peak = max_over_ranks(peak_memory_mb())
        seconds = median([s for s, _ in runs])
        tokens = b.train.seq_length * b.train.micro_batch_size * b.train.micro_batches * runtime.dp
        flops = tokens * training_flops_per_token(cfg.model, b.train.seq_length)
        devices = runtime.env.world_size if current_device().type == "cuda" else 1
        return {"ranks": runtime.env.world_size, "step_s": seconds, "tokens_per_step": tokens,
                "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
                "mfu": mfu(flops, seconds, device_peak_tflops(b.peak_tflops, cfg.model.dtype), devices), **peak}
