"""Reward components by name, and scoring one sample under a per-component timer."""

from __future__ import annotations

import functools
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, get_args

from r1mega.config.choices import RewardName
from r1mega.rewards.accuracy import accuracy
from r1mega.rewards.code import CodeRunner
from r1mega.rewards.format import format_reward
from r1mega.rewards.language import language_consistency
from r1mega.rewards.length import overlong_penalty

BUILTIN = get_args(RewardName)  # the names reward.components takes; Scorer has a function for each
RESERVED_KEYS = ("_target_", "weight")
_MAX_ERROR_CHARS = 300

Component = Callable[[Any], float]
Row = tuple[list[float], int, int, str | None, dict[str, int]]  # values, failures, timeouts, first error, code counts


# A BaseException, so that a broad `except Exception` in math-verify or in a custom reward
# cannot swallow it and turn a time-out into an ordinary 0.
class RewardTimeout(BaseException):
    """A component ran past its time limit."""


def resolve_custom(spec: dict[str, Any]) -> Component:
    """A function called as fn(sample, **kwargs), or an instance of a class built as cls(**kwargs)."""
    from hydra.utils import get_method

    kwargs = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
    target = get_method(spec["_target_"])
    if isinstance(target, type):
        return target(**kwargs)
    return functools.partial(target, **kwargs) if kwargs else target


class Scorer:
    """The configured components as callables of a RewardInput, in a fixed order (`names`)."""

    def __init__(self, builtin: list[str], custom: dict[str, dict[str, Any]], timeout_s: float,
                 language: str = "en", overlong_max_tokens: int | None = None,
                 overlong_cache_tokens: int = 0, code: dict[str, Any] | None = None):
        runner = self.code = CodeRunner(**code) if code is not None else None
        table: dict[str, Component] = {
            "accuracy": functools.partial(accuracy, code=runner),
            "format": lambda s: format_reward(s.response),
            "language": lambda s: language_consistency(s.response, language),
            "overlong": lambda s: overlong_penalty(s.response_tokens, overlong_max_tokens,
                                                   overlong_cache_tokens),
        }
        self.fns: dict[str, Component] = {name: table[name] for name in builtin}
        for name, spec in custom.items():
            self.fns[name] = resolve_custom(spec)
        self.names = list(self.fns)
        self.limits = time_limits(self.names, timeout_s, runner)


def time_limits(names: list[str], timeout_s: float, code: CodeRunner | None) -> dict[str, float]:
    """Each component's time limit: timeout_s, and for accuracy at least a code row's whole run."""
    return {name: max(timeout_s, code.time_limit_s()) if name == "accuracy" and code is not None else timeout_s
            for name in names}


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RewardTimeout in this thread after `seconds`; no limit off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call(fn: Component, sample: Any, timeout_s: float) -> float:
    with time_limit(timeout_s):
        value = float(fn(sample))
    if not math.isfinite(value):
        raise ValueError(f"returned {value}")
    return value


def score_sample(scorer: Scorer, sample: Any) -> Row:
    """Every component of one sample; a failing or slow component scores 0 and is counted."""
    row, failures, timeouts, error = [], 0, 0, None
    for name, fn in scorer.fns.items():
        try:
            value = _call(fn, sample, scorer.limits[name])
        except RewardTimeout as e:
            value, timeouts = 0.0, timeouts + 1
            error = error or f"{name}: {e}"
        except Exception as e:  # a reward bug or a pathological input must not stop training
            value, failures = 0.0, failures + 1
            error = error or f"{name}: {type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
        row.append(value)
    return row, failures, timeouts, error, scorer.code.take_counts() if scorer.code is not None else {}
