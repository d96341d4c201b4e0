"""Cross-field rules of the R1 pipeline's other stages: SFT, rejection sampling, the pipeline itself."""

from __future__ import annotations

from typing import Optional

from r1mega.config.errors import require
from r1mega.config.schema import R1Config


def check_stages(cfg: R1Config, dp: Optional[int]) -> None:
    """Rules that hold whichever entry point runs (dp None: world size unknown); sft.template,
    sft.on_bad_row and each stage's kind were checked against their choices as the config was loaded."""
    s = cfg.sft
    for key in ("max_seq_length", "samples_per_step", "micro_batch_tokens", "epochs"):
        require(getattr(s, key) >= 1, f"sft.{key} must be >= 1, got {getattr(s, key)}")
    require(s.steps >= 0 and s.eval_every >= 0, "sft.steps and sft.eval_every must be >= 0")
    r = cfg.sample
    require(r.samples_per_prompt >= 1, f"sample.samples_per_prompt must be >= 1, got {r.samples_per_prompt}")
    require(1 <= r.keep_per_prompt <= r.samples_per_prompt,
            f"sample.keep_per_prompt={r.keep_per_prompt} must be in [1, sample.samples_per_prompt="
            f"{r.samples_per_prompt}]")
    require(r.prompts_per_call >= 1, f"sample.prompts_per_call must be >= 1, got {r.prompts_per_call}")
    require(r.max_prompts >= 0, f"sample.max_prompts must be >= 0, got {r.max_prompts}")
    require(r.max_response_tokens is None or r.max_response_tokens >= 1,
            f"sample.max_response_tokens must be >= 1, got {r.max_response_tokens}")
    names = [st.name for st in cfg.pipeline.stages]
    for i, st in enumerate(cfg.pipeline.stages):
        require(bool(st.name) and "/" not in st.name and st.name not in names[:i],
                f"pipeline.stages[{i}].name={st.name!r} must be a unique folder name")
        require(st.name not in cfg.pipeline.vars,
                f"pipeline.stages[{i}].name={st.name!r} is also a pipeline.vars key: {{{st.name}}} would be ambiguous")


def check_no_cp(cfg: R1Config, world_size: Optional[int] = None) -> None:
    """What SFT, rejection sampling and evaluation need: they do not split sequences over
    context-parallel ranks (RL training does)."""
    require(cfg.parallel.cp == 1, "parallel.cp > 1: SFT, rejection sampling and evaluation do not split "
            "sequences over context-parallel ranks (RL training does); use parallel.cp=1")


def check_sft_run(cfg: R1Config, world_size: Optional[int] = None) -> None:
    """What `r1mega-sft` needs besides the general rules."""
    s, p = cfg.sft, cfg.parallel
    require(bool(s.train_files), "r1mega-sft needs sft.train_files (JSONL/Parquet with `messages`)")
    check_no_cp(cfg)
    if world_size is not None:
        dp = world_size // (p.tp * p.pp * p.cp)
        require(s.samples_per_step % dp == 0,
                f"sft.samples_per_step={s.samples_per_step} must be a multiple of the data-parallel size {dp}")
