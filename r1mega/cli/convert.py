"""`r1mega-convert`: HF <-> megatron checkpoints under any parallel layout.

    r1mega-convert hf-to-mcore src=/ckpt/Qwen3-8B dst=/ckpt/qwen3-8b-mcore parallel.tp=2 parallel.nproc=2
    r1mega-convert mcore-to-hf src=/ckpt/qwen3-8b-mcore dst=/ckpt/Qwen3-8B-export

A DeepSeek-V3 checkpoint's multi-token-prediction layers are carried unchanged, or with `mtp=true`
loaded into megatron's MTP block (model.mtp), as training would.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from r1mega.checkpoint.hf_config import model_config_from_hf, read_hf_config
from r1mega.checkpoint.hf_convert import load_hf_weights, save_hf
from r1mega.checkpoint.mcore import load_model, read_model_config, save_model
from r1mega.cli.exit import fail
from r1mega.config.loader import compose_config, to_config
from r1mega.config.schema import ModelConfig, MTPConfig, ParallelConfig
from r1mega.config.validate import ConfigError, check_layout, check_model
from r1mega.models.builder import build_model
from r1mega.platform.distributed import running
from r1mega.platform.env import read_env
from r1mega.platform.launch import spawn

DIRECTIONS = ("hf-to-mcore", "mcore-to-hf")


@dataclass
class ConvertConfig:
    src: str = "???"
    dst: str = "???"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    mtp: bool = False  # hf-to-mcore: the checkpoint's MTP layers into megatron's MTP block


def source_model(direction: str, cfg: ConvertConfig, world_size: int) -> ModelConfig:
    """The model config of the source checkpoint, checked against the layout before any rank starts."""
    if direction == "hf-to-mcore":
        model = model_config_from_hf(cfg.src)
        if cfg.mtp:
            layers = read_hf_config(cfg.src).get("num_nextn_predict_layers") or 0
            if not layers:
                raise ConfigError(f"mtp=true: {cfg.src} has no multi-token-prediction layers "
                                  f"(num_nextn_predict_layers: {layers})")
            model.mtp = MTPConfig(num_layers=layers)
    else:
        model = read_model_config(cfg.src)
    check_model(model)
    check_layout(model, cfg.parallel, world_size)
    return model


def convert(direction: str, cfg: ConvertConfig, model: ModelConfig) -> None:
    """One rank's part of the conversion (every rank calls it)."""
    with running(cfg.parallel, cfg.seed):
        chunks = build_model(model, cfg.parallel)
        if direction == "hf-to-mcore":
            load_hf_weights(chunks, model, cfg.src)
            save_model(chunks, model, cfg.dst, carry_from=[cfg.src])  # tokenizer, generation config, ...
        else:
            load_model(chunks, cfg.src)
            save_hf(chunks, model, cfg.dst, carry_from=[cfg.src])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in DIRECTIONS:
        fail(f"usage: r1mega-convert {{{'|'.join(DIRECTIONS)}}} src=PATH dst=PATH [parallel.tp=N ...]")
    ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)
    try:
        cfg: ConvertConfig = to_config(compose_config(argv[1:], config_name="convert"))
    except ConfigError as e:
        fail(str(e))
    env = read_env()
    nproc = cfg.parallel.nproc if env.launcher == "none" and cfg.parallel.nproc else None
    try:
        model = source_model(argv[0], cfg, nproc or env.world_size)
        if nproc and nproc > 1:
            spawn(nproc, convert, argv[0], cfg, model)
        else:
            convert(argv[0], cfg, model)
    except (ValueError, OSError, NotImplementedError, RuntimeError) as e:
        # CheckpointError / ConfigError / UnsupportedModelError are ValueErrors; a failed
        # spawned rank arrives as RuntimeError whose last line is the rank's error.
        fail(str(e).strip().splitlines()[-1])


if __name__ == "__main__":
    main()
