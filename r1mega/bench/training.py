"""Training alone: forward + backward + optimizer step tokens/s of model presets under parallel
layouts, on random tokens. Data-parallel ranks each keep their micro-batches (weak scaling), so
tokens/s against DP ranks is the scaling curve; TP=2 against TP=1 trains the same batch."""

from __future__ import annotations

import copy
from typing import Dict, List

import torch

from r1mega.bench.flops import device_peak_tflops, mfu, training_flops_per_token
from r1mega.bench.measure import max_over_ranks, median, peak_memory_mb, reset_peak_memory
from r1mega.config.loader import compose_config, to_config
from r1mega.config.bench_schema import LayoutConfig
from r1mega.config.schema import R1Config
from r1mega.config.validate import ConfigError, validate
from r1mega.platform.launch import spawn


def layout_config(cfg: R1Config, model: str, layout: LayoutConfig) -> R1Config:
    """cfg with the model preset `model` and the layout's parallel sizes, validated at its world size."""
    out = copy.deepcopy(cfg)
    out.model = to_config(compose_config([f"model={model}"])).model
    out.model.dtype = cfg.bench.train.dtype or cfg.model.dtype
    out.model.attention_backend = cfg.model.attention_backend
    world = layout.tp * layout.pp * layout.dp
    p = out.parallel
    p.tp, p.pp, p.ep, p.nproc, p.vpp, p.pipeline_layout = layout.tp, layout.pp, layout.ep, world, None, None
    # megatron's MoE layer needs sequence parallelism under TP
    p.sequence_parallel = layout.tp > 1 and (p.sequence_parallel or out.model.moe is not None)
    validate(out, world)
    return out


def run(cfg: R1Config) -> Dict:
    b = cfg.bench.train
    rows: List[Dict] = []
    for model in b.models:
        for layout in b.layouts:
            row = {"model": model, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep}
            try:
                run_cfg = layout_config(cfg, model, layout)
            except ConfigError as e:
                rows.append({**row, "skipped": str(e)})
                continue
            result = spawn(run_cfg.parallel.nproc, _rank, run_cfg, timeout=3600.0)[0]
            rows.append({**row, **result})
    return {"seq_length": b.seq_length, "micro_batch_size": b.micro_batch_size, "micro_batches": b.micro_batches,
            "dtype": b.dtype or cfg.model.dtype, "rows": rows}


def _rank(cfg: R1Config) -> Dict[str, float]:
    from megatron.core import parallel_state as ps

    from r1mega.platform.distributed import current_device, destroy, initialize
    from r1mega.trainer.lm_step import train_step
    from r1mega.trainer.rl_setup import build_policy
    from r1mega.trainer.timing import PhaseTimer

    b = cfg.bench
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        _, ddp, optimizer, scheduler = build_policy(cfg, None, steps=b.warmup + b.repeats)
        # Same tokens on the ranks of a model-parallel group, different ones across data-parallel ranks.
        g = torch.Generator().manual_seed(cfg.trainer.seed + ps.get_data_parallel_rank())
        shape = (b.train.micro_batch_size, b.train.seq_length + 1)
        batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(b.train.micro_batches)]
        times, timer = [], PhaseTimer()
        for i in range(b.warmup + b.repeats):
            if i == b.warmup:
                reset_peak_memory()
            with timer("step"):
                train_step(ddp, optimizer, scheduler, batches, b.train.seq_length, b.train.micro_batch_size)
            seconds = timer.seconds.pop("step")
            if i >= b.warmup:
                times.append(seconds)
        peak = max_over_ranks(peak_memory_mb())
        seconds = median(times)
        tokens = b.train.seq_length * b.train.micro_batch_size * b.train.micro_batches * runtime.dp
        flops = tokens * training_flops_per_token(cfg.model, b.train.seq_length)
        devices = runtime.env.world_size if current_device().type == "cuda" else 1
        return {"ranks": runtime.env.world_size, "step_s": seconds, "tokens_per_step": tokens,
                "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
                "mfu": mfu(flops, seconds, device_peak_tflops(b.peak_tflops, cfg.model.dtype), devices), **peak}
    finally:
        destroy()
