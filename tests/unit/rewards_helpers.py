"""Custom reward components for the reward-stack tests; imported by the reward workers by path."""

from __future__ import annotations

import os
import signal
import time


def index_reward(sample, offset: float = 0.0) -> float:
    """metadata["i"] + offset: shows which sample a value came from."""
    return float(sample.metadata.get("i", 0)) + offset


def sleep_in_python(sample) -> float:
    """Loops forever in Python (the inner timer can stop it) on a response containing 'sleep'."""
    while "sleep" in sample.response:
        time.sleep(0.01)
    return index_reward(sample)


def swallow_and_sleep(sample) -> float:
    """Sleeps forever and swallows every Exception, like careless user code."""
    while True:
        try:
            time.sleep(0.01)
        except Exception:
            pass


def hang_in_c(sample) -> float:
    """Blocks SIGALRM, then sleeps: no inner timer can stop it, only the parent's kill."""
    if "hang" in sample.response:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(1000)
    return index_reward(sample)


def die(sample) -> float:
    """The worker process exits on a response containing 'die'."""
    if "die" in sample.response:
        os._exit(3)
    return index_reward(sample)


def boom(sample) -> float:
    """Raises with a 1 MB message."""
    raise RuntimeError("boom " + "x" * 1_000_000)


def not_a_number(sample) -> float:
    """Returns NaN, which must count as a failure."""
    return float("nan")


class Constant:
    """A class target: built once from its kwargs, then called with each sample."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, sample) -> float:
        return self.value


class BrokenInit:
    """A class target whose construction fails (only ever inside a worker)."""

    def __init__(self):
        raise RuntimeError("cannot build this reward")

    def __call__(self, sample) -> float:
        return 0.0


class FlakyStart:
    """A class target that counts its constructions in `counter` (a file) and fails those numbered in
    `failing`; called, it dies on 'die' like `die`."""

    def __init__(self, counter: str, failing: list):
        with open(counter, "a+") as f:
            f.seek(0)
            number = len(f.read()) + 1
            f.write("x")
        if number in failing:
            raise RuntimeError(f"start {number} fails")

    def __call__(self, sample) -> float:
        return die(sample)
