"""The `bench` group: what `r1mega-bench` measures, how long, where results go."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, List, Optional, get_args

from r1mega.config.choices import BenchSuite, Dtype, Engine, RolloutPromptSet


@dataclass
class LayoutConfig:
    """One parallel layout of the training benchmark; world size tp x pp x dp, ep within it."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # MoE models only; layouts with ep > 1 are skipped for dense ones


@dataclass
class TrainBenchConfig:
    models: List[str] = field(default_factory=lambda: ["tiny", "tiny_moe"])  # model presets (conf/model)
    layouts: List[LayoutConfig] = field(default_factory=lambda: [
        LayoutConfig(), LayoutConfig(dp=2), LayoutConfig(tp=2), LayoutConfig(dp=2, ep=2)])
    seq_length: int = 256
    micro_batch_size: int = 4  # rows per micro-batch, per data-parallel rank
    micro_batches: int = 2  # per optimizer step, per data-parallel rank (weak scaling over dp)
    dtype: Optional[Annotated[str, Dtype]] = None  # None (model.dtype) | fp32 | bf16 | fp16 for these models


@dataclass
class RolloutBenchConfig:
    # every engine; those not installed here are skipped
    engines: List[Annotated[str, Engine]] = field(default_factory=lambda: list(get_args(Engine)))
    batch_sizes: List[int] = field(default_factory=lambda: [1, 4, 16, 64])
    new_tokens: int = 64  # every row decodes exactly this many (EOS ignored)
    prompt_sets: List[Annotated[str, RolloutPromptSet]] = field(
        default_factory=lambda: list(get_args(RolloutPromptSet)))
    prompt_median: int = 64  # long-tailed set: lognormal prompt lengths
    prompt_p99: int = 512


@dataclass
class PackingBenchConfig:
    """The update phase over THD packs against right-padded rows (trainer.micro_batch_tokens each)."""

    rows: int = 64  # rows of each set
    prompt_tokens: int = 32  # long-tailed set: every prompt this long
    median_response: int = 64  # long-tailed set: lognormal response lengths
    p99_response: int = 2000
    longest_response: int = 4096


@dataclass
class PeerBenchConfig:
    """Time to accuracy against TRL's GRPOTrainer: both train the run's model from its pre-trained base
    checkpoint (exported to HF with the tokenizer) with the run's data, algorithm, optimizer, response
    length and rewards, and evaluate greedy on the held-out split every eval_every steps."""

    steps: int = 40
    eval_every: int = 5
    targets: List[float] = field(default_factory=lambda: [0.85, 0.9])  # held-out greedy accuracies to time
    runs: int = 3  # per side, seeds trainer.seed + 0, 1, ...: one run's time to a target is mostly its luck


@dataclass
class AsyncBenchConfig:
    """Synchronous against asynchronous RL on the same work and the same cores: `ranks` synchronous
    data-parallel ranks against ranks - workers trainer ranks and `workers` rollout workers, both
    from the run's pre-trained base model, for `steps` steps each, run alternately `runs` times."""

    steps: int = 20
    ranks: int = 2  # processes on each side (cores are shared out among them)
    workers: int = 1
    max_staleness: int = 1
    partial: bool = False
    runs: int = 2


@dataclass
class BenchConfig:
    """`r1mega-bench`: which suites to run, how long, where results go."""

    suites: List[Annotated[str, BenchSuite]] = field(default_factory=lambda: list(get_args(BenchSuite)))
    output_dir: str = "benchmarks/results"
    warmup: int = 1  # untimed repetitions first (allocator, caches, first-call compilation)
    repeats: int = 3  # timed repetitions; medians are reported
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs by name, none on CPU
    train: TrainBenchConfig = field(default_factory=TrainBenchConfig)
    rollout: RolloutBenchConfig = field(default_factory=RolloutBenchConfig)
    packing: PackingBenchConfig = field(default_factory=PackingBenchConfig)
    peer: PeerBenchConfig = field(default_factory=PeerBenchConfig)
    asynchronous: AsyncBenchConfig = field(default_factory=AsyncBenchConfig)  # the `async` suite
