"""Compose, type-check and validate the config: every entry point goes through here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from r1mega.config.choices import check_choices
from r1mega.config.schema import R1Config, register
from r1mega.config.validate import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _one_line(exc: BaseException) -> str:
    """First line of an exception and of its causes: Hydra/OmegaConf messages span many lines."""
    parts: List[str] = []
    while exc is not None:
        text = str(exc).strip().splitlines()
        if text and text[0] not in parts and "$VALUE" not in text[0]:
            parts.append(text[0])
        exc = exc.__cause__ or exc.__context__
    return "; ".join(parts)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed (not yet typed-out) config for these command-line overrides."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except Exception as e:  # Hydra raises several types for bad overrides and unknown keys
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def to_config(cfg: DictConfig) -> R1Config:
    """Typed R1Config from a composed DictConfig; missing or mistyped values, and values outside a
    key's choices (its Literal in r1mega.config.choices), raise ConfigError."""
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {_one_line(e)}" if key else _one_line(e)) from None
    check_choices(typed)
    return typed


def load_config(overrides: Sequence[str] = (), world_size: Optional[int] = None,
                entry_rules: Optional[Callable[[R1Config, Optional[int]], None]] = None) -> R1Config:
    """compose -> type-check -> cross-field validation, all before any process group starts."""
    cfg = to_config(compose_config(overrides))
    validate(cfg, world_size, entry_rules)
    return cfg


def to_yaml(cfg: R1Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
