"""The safe arithmetic evaluator."""

import re
from fractions import Fraction

import pytest

from r1mega.rewards import arith
from r1mega.rewards.arith import ExpressionError, evaluate, numbers_in, parse


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 - 4 - 3", 3),  # left associative
    ("24 / 4 / 2", 3),
    ("1 / 3 + 1 / 6", Fraction(1, 2)),  # exact, no float rounding
    ("-3 + 5", 2),
    ("-(-(4))", 4),
    ("+7", 7),
    ("2 * -3", -6),
    ("0.1 + 0.2", Fraction(3, 10)),
    (".5 * 4", 2),
    ("(25 - 5) × 4 ÷ 2", 40),
    ("  ( ( 8 ) )  ", 8),
    ("007", 7),
])
def test_values(expr, value):
    assert evaluate(expr) == value


def test_numbers_in_order_and_types():
    assert numbers_in("(25 - 5) * 4 / 2.5") == [25, 5, 4, Fraction(5, 2)]
    assert all(type(n) is int for n in numbers_in("1 + 2"))
    parsed = parse("3 * (4 - 1)")
    assert parsed.value == 9 and parsed.numbers == [3, 4, 1]


@pytest.mark.parametrize("expr, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("1 +", "end of expression"),
    ("(1 + 2", "missing ')'"),
    ("1 + 2)", "after the expression"),
    ("1 2", "after the expression"),
    ("1 / 0", "division by zero"),
    ("5 / (3 - 3)", "division by zero"),
    ("1..2", "malformed number"),
    (".", "malformed number"),
    ("2 ** 3", "unexpected '*'"),
    ("2 ^ 3", "unexpected character"),
    ("1e999999", "unexpected character 'e'"),
    ("x + 1", "unexpected character 'x'"),
    ("__import__('os').system('true')", "unexpected character '_'"),
    ("(lambda: 1)()", "unexpected character 'l'"),
    ("1 + ٣", "unexpected character"),  # non-ASCII digits are not numbers here
    ("4²", "unexpected character"),
])
def test_rejects(expr, message):
    with pytest.raises(ExpressionError, match=re.escape(message)):
        evaluate(expr)


def test_error_is_an_arithmetic_error():
    with pytest.raises(ArithmeticError):
        evaluate("1/0")


def test_limits():
    with pytest.raises(ExpressionError, match="longer than"):
        evaluate("1+" * 300 + "1")
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate("(" * 100 + "1" + ")" * 100)
    with pytest.raises(ExpressionError, match="nested deeper"):
        evaluate("-" * 100 + "1")
    with pytest.raises(ExpressionError, match="digits"):
        evaluate("9" * (arith.MAX_DIGITS + 1))
    # within the limits, the deepest and the biggest still evaluate
    depth = arith.MAX_DEPTH - 1
    assert evaluate("(" * depth + "1" + ")" * depth) == 1
    assert evaluate("9" * arith.MAX_DIGITS) == int("9" * arith.MAX_DIGITS)


def test_worst_case_inputs_stay_bounded():
    """The limits bound the work: no value outside them is ever formed (benchmarks/rewards times these)."""
    big = "9" * arith.MAX_DIGITS
    cases = ["*".join([big] * 16), "/".join([big] * 16), "+".join(["1/7"] * 60), "1/(" * 10 + "3" + ")" * 10]
    for expr in cases:
        value = evaluate(expr[: arith.MAX_CHARS])
        assert abs(value.numerator) <= arith._MAX_MAGNITUDE and value.denominator <= arith._MAX_MAGNITUDE
    assert evaluate(cases[0]) == Fraction(int(big) ** 16)
