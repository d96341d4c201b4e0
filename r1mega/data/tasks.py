"""Built-in tasks, generated with no download: multi-digit arithmetic, countdown, and code
(programs run against hidden tests: r1mega.data.code_task).

Each problem belongs to the held-out split or to the train split by a hash of the problem
itself (commuted operands and reordered numbers count as the same problem), so the splits
are disjoint whatever their sizes and seeds. Difficulty is adjustable by keyword knobs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import operator
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from r1mega.data.code_task import code_key, code_problem
from r1mega.data.prompts import PromptRecord

TEST_SHARE = 10  # one problem in TEST_SHARE belongs to the held-out split
# the code task has fewer distinct problems (about 1,000): one in four is held out, some 250 of them
TEST_SHARES = {"code": 4}
SPLITS = ("train", "test")
_ATTEMPTS = 200  # draws per requested problem before a split counts as exhausted
# No final period: the R1-Zero template appends ". Assistant:" after the prompt.
COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Return the final answer in <answer> "
    "</answer> tags, for example <answer> (1 + 2) / 3 </answer>"
)
_INT_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _is_test(key: str, share: int = TEST_SHARE) -> bool:
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % share == 0


def arithmetic(rng: np.random.Generator, digits: int = 2, min_digits: int = 1, ops: str = "+-*"
               ) -> PromptRecord:
    """`a op b` with operands of min_digits..digits digits; subtraction never goes negative."""
    if not 1 <= min_digits <= digits <= 18:  # operands are drawn as int64
        raise ValueError(f"arithmetic: need 1 <= min_digits <= digits <= 18, got min_digits={min_digits}, "
                         f"digits={digits}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic: ops must be a non-empty string of + - *, got {ops!r}")
    low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    op = ops[int(rng.integers(len(ops)))]
    a, b = rng.integers(low, 10 ** digits, size=2).tolist()
    if op == "-" and b > a:
        a, b = b, a
    return PromptRecord("", f"What is {a} {op} {b}?", None, str(_INT_OPS[op](a, b)), "arithmetic",
                        {"a": a, "b": b, "op": op})


def _count_range(count: Any) -> Tuple[int, int]:
    """An int is exact; a pair [lo, hi] means lo..hi inclusive."""
    low, high = (int(count),) * 2 if isinstance(count, (int, np.integer)) else (int(count[0]), int(count[-1]))
    if not 2 <= low <= high:
        raise ValueError(f"countdown: count must be >= 2 or a range [lo, hi] with 2 <= lo <= hi, got {count}")
    return low, high


# Exact rationals as (numerator, denominator) int pairs: Fraction's normalising on every
# operation made countdown generation several times slower.
_RATIONAL = {
    "+": lambda x, y: (x[0] * y[1] + y[0] * x[1], x[1] * y[1]),
    "-": lambda x, y: (x[0] * y[1] - y[0] * x[1], x[1] * y[1]),
    "*": lambda x, y: (x[0] * y[0], x[1] * y[1]),
    "/": lambda x, y: (x[0] * y[1], x[1] * y[0]),
}


def random_expression(draws: Iterator[float], numbers: Sequence[int]) -> Tuple[Fraction, str]:
    """A random expression tree using each number once, from uniform draws: its value and text."""
    values, texts = [(n, 1) for n in numbers], [str(n) for n in numbers]
    ops = list(_RATIONAL)
    while len(values) > 1:
        i = int(next(draws) * len(values))
        j = int(next(draws) * (len(values) - 1))
        j += j >= i  # a second operand distinct from the first
        op = ops[int(next(draws) * len(ops))]
        if op == "/" and values[j][0] == 0:
            op = "+"
        value, text = _RATIONAL[op](values[i], values[j]), f"({texts[i]} {op} {texts[j]})"
        for k in sorted((i, j), reverse=True):
            del values[k], texts[k]
        values.append(value)
        texts.append(text)
    # the outermost pair of parentheses is the last one added, so it is safe to drop
    return Fraction(*values[0]), texts[0][1:-1] if len(numbers) > 1 else texts[0]


def countdown(rng: np.random.Generator, count: Any = (3, 4), max_number: int = 20, max_target: int = 100
              ) -> PromptRecord:
    """Numbers in 1..max_number and an integer target in 1..max_target that they reach."""
    low, high = _count_range(count)
    if max_number < 1 or max_target < 1:
        raise ValueError(f"countdown: max_number and max_target must be >= 1, got {max_number}, {max_target}")
    for _ in range(10_000):
        draws = iter(rng.random(1 + 4 * high).tolist())  # one call: per-scalar numpy draws are slow
        size = low + int(next(draws) * (high - low + 1))
        numbers = [1 + int(next(draws) * max_number) for _ in range(size)]
        value, expression = random_expression(draws, numbers)
        if value.denominator == 1 and 1 <= value <= max_target:
            target = int(value)
            return PromptRecord("", COUNTDOWN_PROMPT.format(numbers=numbers, target=target), None, expression,
                                "countdown", {"numbers": numbers, "target": target})
    raise ValueError(f"countdown: no target in 1..{max_target} found for count={count}, "
                     f"max_number={max_number}")


GENERATORS: Dict[str, Callable[..., PromptRecord]] = {"arithmetic": arithmetic, "countdown": countdown,
                                                      "code": code_problem}


def problem_key(record: PromptRecord) -> str:
    """What makes two problems the same, for the split and for de-duplication."""
    m = record.metadata
    if record.data_source == "code":
        return code_key(record)
    if record.data_source == "countdown":
        return json.dumps(["countdown", sorted(m["numbers"]), m["target"]])
    a, b = (min(m["a"], m["b"]), max(m["a"], m["b"])) if m["op"] in "+*" else (m["a"], m["b"])
    return json.dumps(["arithmetic", a, m["op"], b])


def _check(name: str, split: str, size: int, difficulty: Dict[str, Any]) -> None:
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    knobs = list(inspect.signature(GENERATORS[name]).parameters)[1:]
    unknown = set(difficulty) - set(knobs)
    if unknown:
        raise ValueError(f"{name}: unknown difficulty knob(s) {sorted(unknown)}; known: {', '.join(knobs)}")


def make_task(name: str, split: str, size: int, seed: int, **difficulty: Any) -> List[PromptRecord]:
    """`size` problems of a built-in task's split, deterministic in (name, split, seed, difficulty).

    The held-out split has no repeats; the train split may repeat problems of small spaces.
    """
    _check(name, split, size, difficulty)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out: List[PromptRecord] = []
    seen = set()
    for _ in range(_ATTEMPTS * max(size, 1)):
        if len(out) == size:
            break
        record = GENERATORS[name](rng, **difficulty)
        key = problem_key(record)
        if _is_test(key, TEST_SHARES.get(name, TEST_SHARE)) != (split == "test") or key in seen:
            continue
        if split == "test":  # held-out problems count once each; train follows the task's distribution
            seen.add(key)
        record.prompt_id = f"{name}-{split}-{len(out)}"
        out.append(record)
    if len(out) < size:
        raise ValueError(f"{name}: only {len(out)} distinct {split} problems found at difficulty "
                         f"{difficulty}; ask for fewer or make the task harder")
    return out


def write_task(records: Sequence[PromptRecord], path: str | Path) -> Path:
    """JSONL rows that load_prompts reads back into the same records."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            text = {"prompt": r.prompt} if r.messages is None else {"messages": r.messages}
            row = {"id": r.prompt_id, **text, "answer": r.answer, "data_source": r.data_source,
                   "metadata": r.metadata}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
