"""The config error type and the two ways rules raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message names the keys and the fix."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def one_of(value, allowed, key: str) -> None:
    require(value in allowed, f"{key}={value!r} is not one of {sorted(map(str, allowed))}")
