"""Compose, type-check and validate the config: every entry point goes through here."""

from __future__ import annotations

from pathlib import Path
from dataclasses import is_dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
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
    # the run config's optional sections (other entry points' schemas have none)
    hydra_overrides, later = _split_optional_sections(overrides) if config_name == "config" else (list(overrides), [])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=hydra_overrides)
    except Exception as e:  # Hydra raises several types for bad overrides and unknown keys
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    for key, value in later:
        try:
            _set_in_optional_section(cfg, key, value)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={value!r}: {_one_line(e)}") from None
    return cfg


def _split_optional_sections(overrides: Sequence[str]) -> Tuple[List[str], List[Tuple[str, Any]]]:
    """(what Hydra applies, (key, value) r1mega applies after it). An optional section that is off
    (model.moe, model.mtp, ...: None) cannot take a value through Hydra (OmegaConf merges into the None
    node and fails), so `model.mtp.num_layers=1` or `model.mtp={num_layers: 1}` on a preset without MTP
    goes to _set_in_optional_section, which switches the section on with its schema defaults first."""
    parser = OverridesParser.create()
    hydra_overrides, later = [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:
            hydra_overrides.append(text)  # Hydra reports the syntax error
            continue
        key = override.key_or_group
        # all of them, null too, so they apply in their order (`model.mtp.num_layers=2 model.mtp=null`: off)
        if override.type == OverrideType.CHANGE and override.package is None and _in_optional_section(key):
            later.append((key, override.value()))
        else:
            hydra_overrides.append(text)
    return hydra_overrides, later


def _in_optional_section(key: str) -> bool:
    """Does `key` lie in, or name, an Optional[dataclass] field of the schema (with a dotted key below it)?"""
    node: Any = R1Config
    for part in key.split("."):
        hints = get_type_hints(node) if is_dataclass(node) else {}
        if part not in hints:
            return False
        if _optional_dataclass(hints[part]) is not None:
            return True
        node = hints[part]
    return False


def _optional_dataclass(hint) -> Optional[type]:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Union and len(args) == 1 and is_dataclass(args[0]):
        return args[0]
    return None


def _set_in_optional_section(cfg: DictConfig, key: str, value: Any) -> None:
    """Switch on the optional sections `key` names or lies in (with their schema defaults), then set `key`;
    `key` = None switches the section it names off."""
    if value is None:
        OmegaConf.update(cfg, key, None, merge=False)
        return
    node: Any = R1Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hint = get_type_hints(node).get(part) if is_dataclass(node) else None
        if hint is None:
            break  # an unknown key: OmegaConf names it below
        section = _optional_dataclass(hint)
        if section is not None:
            path = ".".join(parts[:i + 1])
            if OmegaConf.select(cfg, path) is None:
                OmegaConf.update(cfg, path, OmegaConf.structured(section), merge=False)
        node = section or hint
    OmegaConf.update(cfg, key, value, merge=True)


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
