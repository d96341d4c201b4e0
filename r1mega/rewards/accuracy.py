"""Answer accuracy: math-verify for math, numeric and exact match, the countdown checker, and
programs run against their tests.

The prediction is the content of the last <answer>...</answer>; a response without a closed answer
tag scores 0 (R1-Zero rewards only an answer given in the agreed format). A code row (one whose
metadata has `tests`) is scored by reward.code's runner on the response's final code block instead.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from r1mega.rewards.arith import ExpressionError
from r1mega.rewards.arith import parse as parse_expression
from r1mega.rewards.code import is_code_row
from r1mega.rewards.tags import extract_answer

REL_TOL = Fraction(1, 10 ** 6)
_MAX_NUMBER_CHARS = 64
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\d+/\d+", re.ASCII)


def parse_number(text: str) -> Fraction | None:
    """An integer, decimal (thousands commas allowed) or fraction a/b; None for anything else."""
    text = text.strip().rstrip(".")
    if len(text) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except ZeroDivisionError:
        return None


def numbers_close(a: Fraction, b: Fraction) -> bool:
    """Equal within a relative 1e-6 of the larger magnitude (so 0 only matches 0)."""
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def numeric_accuracy(response: str, answer: str) -> float:
    """1.0 when the answer tag and the ground truth are the same number (relative 1e-6)."""
    pred, gold = extract_answer(response), parse_number(answer)
    value = parse_number(pred) if pred is not None else None
    if value is None or gold is None:
        return 0.0
    return 1.0 if numbers_close(value, gold) else 0.0


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_accuracy(response: str, answer: str) -> float:
    """1.0 when the answer tag equals the ground truth up to case and runs of whitespace."""
    pred = extract_answer(response)
    return 1.0 if pred is not None and _normalise(pred) == _normalise(answer) else 0.0


class _NoTimeoutNotice(logging.Filter):
    # math-verify warns that its own timeouts are off; the reward runner bounds time instead
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


def _as_math(text: str) -> str:
    # math-verify reads LaTeX only between delimiters or in \boxed{}: wrap a bare answer
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_accuracy(response: str, answer: str) -> float:
    """math-verify equivalence of the ground truth (first: verify is asymmetric) and the answer tag."""
    pred = extract_answer(response)
    if not pred:
        return 0.0
    fast_gold, fast_pred = parse_number(answer), parse_number(pred)
    if fast_gold is not None and fast_pred is not None:
        return 1.0 if numbers_close(fast_pred, fast_gold) else 0.0
    from math_verify import parse, verify  # sympy is slow to import: only where math is scored

    # math-verify's own timeouts use signal.alarm, which only works in a main thread: off here,
    # because the reward stack bounds each call itself (timer in the worker, kill from the parent)
    gold = parse(_as_math(answer), parsing_timeout=None)
    target = parse(_as_math(pred), parsing_timeout=None)
    if not gold or not target:
        return 0.0
    return 1.0 if verify(gold, target, timeout_seconds=None) else 0.0


def countdown_accuracy(response: str, answer: str, metadata: Mapping[str, Any]) -> float:
    """1.0 when the answer expression uses each of metadata["numbers"] once and equals the target."""
    if "numbers" not in metadata:
        raise ValueError("countdown sample without metadata['numbers']")
    target = parse_number(str(metadata.get("target", answer)))  # the answer field holds it too
    if target is None:
        raise ValueError("countdown sample whose target is not a number")
    expr = extract_answer(response)
    if expr is None:
        return 0.0
    try:
        parsed = parse_expression(expr)
    except ExpressionError:
        return 0.0
    # multiset equality; Fraction(3) == 3 and hashes alike, so decimals like 3.0 count as 3
    if Counter(parsed.numbers) != Counter(Fraction(n) for n in metadata["numbers"]):
        return 0.0
    return 1.0 if parsed.value == target else 0.0


def accuracy(sample: Any, code: Callable[[Any], float] | None = None) -> float:
    """Dispatch: code rows (metadata with `tests`) to `code`, then on sample.data_source: countdown,
    arithmetic (numeric), anything else math-verify."""
    if is_code_row(sample.metadata):
        if code is None:
            raise ValueError("a code row (its metadata has tests) needs reward.code (reward=code) to be scored")
        return code(sample)
    if sample.data_source == "countdown":
        return countdown_accuracy(sample.response, sample.answer, sample.metadata)
    if sample.data_source == "arithmetic":
        return numeric_accuracy(sample.response, sample.answer)
    return math_accuracy(sample.response, sample.answer)
