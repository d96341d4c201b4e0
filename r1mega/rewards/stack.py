"""The reward stack: weighted components, each sample scored under a time limit.

math-verify (sympy) can hang on adversarial strings and a custom reward may hang inside C
code where Python signals never arrive, so scoring runs in worker processes: a timer
inside the worker bounds each component, and the parent kills a worker that misses its
hard deadline, scores that sample 0 (counted as a time-out), starts a new worker and goes
on with the rest. A failing or hanging component scores 0 and is counted; scoring never
crashes the run.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from hydra.utils import get_method

from r1mega.rewards.code import CodeRunner
from r1mega.rewards.components import BUILTIN, Row, Scorer, score_sample, time_limits
from r1mega.rewards.sandbox import SandboxUnavailable
from r1mega.rewards.language import LANGUAGES
from r1mega.rewards.length import overlong_penalty
from r1mega.rewards.pool import WorkerPool

log = logging.getLogger("r1mega.rewards")


@dataclass
class RewardInput:
    """One response to score."""

    response: str  # generated text only, the prompt excluded
    answer: str  # ground truth
    data_source: str = ""  # "arithmetic", "countdown", "math", or a dataset's name
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. countdown: numbers, target
    response_tokens: int = 0
    truncated: bool = False  # stopped by the length cap, not by EOS or a stop string


@dataclass
class RewardScores:
    """Per-sample totals and unweighted component values, in input order."""

    total: list[float]
    components: dict[str, list[float]]
    failures: int = 0  # components that raised
    timeouts: int = 0  # components (or whole samples, on a hard kill) that ran out of time
    counts: dict[str, int] = field(default_factory=dict)  # code rows: how their tests ended (code.OUTCOMES)


def _plain(spec: Any) -> dict[str, Any]:
    # OmegaConf nodes pickle slowly and drag omegaconf into the workers: hand them plain dicts
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:
        pass
    return dict(spec)


def _check_config(components: Mapping[str, float], custom: dict[str, dict[str, Any]], timeout_s: float,
                  num_workers: int, language: str, overlong_max_tokens: int | None,
                  overlong_cache_tokens: int) -> None:
    unknown = [k for k in components if k not in BUILTIN]
    if unknown:
        raise ValueError(f"unknown reward component(s) {unknown}; built in: {list(BUILTIN)} "
                         "(add your own under reward.custom with a _target_)")
    for name, spec in custom.items():
        if name in components:
            raise ValueError(f"custom reward {name!r} has the name of a built-in component")
        if "_target_" not in spec:
            raise ValueError(f"custom reward {name!r} needs a _target_ (dotted path to a function)")
    if "overlong" in components:
        if not overlong_max_tokens:
            raise ValueError("the 'overlong' reward needs overlong_max_tokens")
        overlong_penalty(0, overlong_max_tokens, overlong_cache_tokens)  # raises on bad sizes
    if "language" in components and language not in LANGUAGES:
        raise ValueError(f"reward language {language!r} is not supported; known: {', '.join(LANGUAGES)}")
    if not timeout_s > 0 or num_workers < 0:
        raise ValueError(f"need timeout_s > 0 and num_workers >= 0, got {timeout_s}, {num_workers}")


def _code_runner(code: dict[str, Any] | None) -> CodeRunner | None:
    """reward.code's runner, checked here: refused, saying why, where bubblewrap cannot run; without a
    sandbox only when asked for by name."""
    if code is None:
        return None
    try:
        runner = CodeRunner(**code)
        runner.check()
    except SandboxUnavailable as e:
        raise SandboxUnavailable(f"reward.code cannot run programs safely: {e}. Programs never run unsandboxed "
                                 f"unless reward.code.sandbox=none is set") from None
    if runner.bwrap is None:
        log.warning("reward.code.sandbox=none: model-written programs will run without a sandbox, as the trainer's "
                    "user, with its files and network in reach")
    return runner


class RewardStack:
    """score(samples) -> RewardScores, with total = sum over components of weight x value."""

    def __init__(self, components: Mapping[str, float], custom: Mapping[str, Any] | None = None,
                 timeout_s: float = 5.0, num_workers: int = 2, language: str = "en",
                 overlong_max_tokens: int | None = None, overlong_cache_tokens: int = 0,
                 code: Mapping[str, Any] | None = None):
        custom = {str(k): _plain(v) for k, v in (custom or {}).items()}
        code = _plain(code) if code is not None else None
        _check_config(components, custom, timeout_s, num_workers, language, overlong_max_tokens,
                      overlong_cache_tokens)
        self.weights = {**{k: float(w) for k, w in components.items()},
                        **{k: float(v.get("weight", 1.0)) for k, v in custom.items()}}
        bad = [k for k, w in self.weights.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"reward weights must be finite numbers: {bad}")
        spec = {"builtin": list(components), "custom": custom, "timeout_s": float(timeout_s),
                "language": language, "overlong_max_tokens": overlong_max_tokens,
                "overlong_cache_tokens": overlong_cache_tokens, "code": code}
        for spec_ in custom.values():
            get_method(spec_["_target_"])  # import it here too: a bad _target_ fails at start-up
        self._spec, self._scorer = spec, None
        self.names = list(components) + list(custom)
        runner = _code_runner(code)
        self._unsandboxed = runner is not None and runner.bwrap is None
        # the inner timers allow each component its limit; the parent's deadline adds a margin
        deadline_s = sum(time_limits(self.names, timeout_s, runner).values()) + 2.0
        self._pool = WorkerPool(num_workers, spec, deadline_s) if num_workers > 0 else None
        # the one thread that drives the pool: scoring overlaps with whatever the caller does meanwhile
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="r1mega-rewards")
        if self._pool is None:
            log.warning("reward.num_workers=0: rewards are scored in the trainer's process, where only SIGALRM "
                        "limits them and C-level work (sympy on a huge number) cannot be stopped; for tests only")
        self._closed = False

    def score(self, samples: list[RewardInput]) -> RewardScores:
        """Score every sample; results are in input order whatever happens to the workers."""
        return self.combine(self.submit(samples).result())

    def submit(self, samples: list[RewardInput]) -> Future:
        """Start scoring in the background; the future's result is the rows (RewardStack.combine makes
        RewardScores of them). Submissions are scored one after another, each by all the workers."""
        if self._closed:
            raise RuntimeError("RewardStack.score after close()")
        if self._pool is not None:
            return self._scoring.submit(self._pool.run, samples)
        done: Future = Future()  # num_workers=0, for tests only (see __init__): here, now, under SIGALRM
        done.set_result([score_sample(self._local_scorer(), s) for s in samples])
        return done

    def streaming(self, make_input: Callable[[int, list[int], str], RewardInput], chunk: int = 16
                  ) -> "StreamingScore":
        """A scorer of rows as a generator finishes them (see StreamingScore)."""
        return StreamingScore(self, make_input, chunk)

    def _local_scorer(self) -> Scorer:
        # built on first use: a custom class may be costly to instantiate, and workers have their own
        if self._scorer is None:
            self._scorer = Scorer(**self._spec)
        return self._scorer

    def combine(self, rows: list[Row]) -> RewardScores:
        failures = sum(r[1] for r in rows)
        timeouts = sum(r[2] for r in rows)
        first = next((r[3] for r in rows if r[3]), None)
        if first:
            log.warning("rewards: %d failure(s), %d time-out(s) in %d samples; first: %s",
                        failures, timeouts, len(rows), first)
        comps = {name: [r[0][j] for r in rows] for j, name in enumerate(self.names)}
        weights = [self.weights[name] for name in self.names]
        total = [sum(w * v for w, v in zip(weights, r[0], strict=True)) for r in rows]
        counts: Counter = Counter()
        for r in rows:
            counts.update(r[4])
        if self._unsandboxed:  # once per scoring of a batch: every step, however its rows were streamed
            programs = sum(any(v for k, v in r[4].items() if k != "no_code") for r in rows)
            if programs:
                log.warning("reward.code.sandbox=none: %d model-written programs ran WITHOUT a sandbox, with the "
                            "trainer's user's access to files and network", programs)
        return RewardScores(total, comps, failures, timeouts, dict(counts))

    def close(self) -> None:
        """Stop the worker processes; idempotent."""
        if self._pool is not None:
            self._scoring.shutdown(wait=True, cancel_futures=True)
            self._pool.close()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamingScore:
    """Rows scored while the rest of the batch is still generating: the engine reports each finished row
    (row index, response tokens, finish reason), `make_input` turns it into a RewardInput, and the rows
    go to the workers once `chunk` have gathered and the workers are free: each submission waits for its
    slowest sample, so the rows that finish meanwhile go together in the next, not in many small ones.
    result(n) waits for all and gives RewardScores in row order, the same as score() on the finished
    batch: each sample's score depends on that sample alone."""

    def __init__(self, stack: RewardStack, make_input: Callable[[int, list[int], str], RewardInput], chunk: int):
        self.stack, self.make_input, self.chunk = stack, make_input, max(1, chunk)
        self.pending: list[tuple[int, RewardInput]] = []
        self.submitted: list[tuple[list[int], Future]] = []

    def row_done(self, row: int, response_ids: list[int], reason: str) -> None:
        self.pending.append((row, self.make_input(row, list(response_ids), reason)))
        if len(self.pending) >= self.chunk and (not self.submitted or self.submitted[-1][1].done()):
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            rows, inputs = zip(*self.pending)
            self.submitted.append((list(rows), self.stack.submit(list(inputs))))
            self.pending = []

    def result(self, count: int) -> RewardScores:
        self._flush()
        by_row: dict[int, Row] = {}
        for rows, future in self.submitted:
            by_row.update(zip(rows, future.result()))
        missing = [i for i in range(count) if i not in by_row]
        if missing or len(by_row) != count:
            raise RuntimeError(f"streamed scoring: rows {missing[:5]} were never reported finished "
                               f"({len(by_row)} scored of {count})")
        return self.stack.combine([by_row[i] for i in range(count)])
