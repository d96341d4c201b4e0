"""Accuracy rewards: numeric, exact, math-verify and countdown, and the dispatch on data_source."""

from fractions import Fraction

import pytest

from r1mega.rewards.accuracy import (
    accuracy,
    countdown_accuracy,
    exact_accuracy,
    math_accuracy,
    numeric_accuracy,
    parse_number,
)
from r1mega.rewards.stack import RewardInput


def tagged(answer: str) -> str:
    return f" <think> working </think> <answer> {answer} </answer>"


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("-7", -7), ("+3", 3), ("3.25", Fraction(13, 4)), ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)), ("1,234,567", 1234567), ("1,234.5", Fraction(2469, 2)), (" 12. ", 12),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1,23", "12,3456", "1e5", "3/0", "1/2/3", "٣", "1_000",
                                  "9" * 100, "\\frac{1}{2}", "4 apples"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("pred, gold, score", [
    ("42", "42", 1.0), ("42.0", "42", 1.0), ("1,000", "1000", 1.0), ("3/4", "0.75", 1.0),
    ("0.3333333", "1/3", 1.0),  # within 1e-6 relative
    ("0.333", "1/3", 0.0), ("41", "42", 0.0), ("0.0000001", "0", 0.0), ("0", "0", 1.0),
    ("forty-two", "42", 0.0),
])
def test_numeric_accuracy(pred, gold, score):
    assert numeric_accuracy(tagged(pred), gold) == score


def test_numeric_needs_the_answer_tag():
    assert numeric_accuracy("the answer is 42", "42") == 0.0
    assert numeric_accuracy("", "42") == 0.0


def test_exact_accuracy():
    assert exact_accuracy(tagged("New   York"), "new york") == 1.0
    assert exact_accuracy(tagged("Boston"), "new york") == 0.0
    assert exact_accuracy("New York", "new york") == 0.0


@pytest.mark.parametrize("pred, gold", [
    ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("$0.5$", "\\frac{1}{2}"), ("\\boxed{\\frac{3}{4}}", "0.75"), ("\\sqrt 2", "\\sqrt{2}"),
    ("1 + x", "x+1"), ("\\{2, 1\\}", "\\{1,2\\}"), ("10.0", "10"), ("\\dfrac{3}{4}", "0.75"),
])
def test_math_equivalences(pred, gold):
    assert math_accuracy(tagged(pred), gold) == 1.0


@pytest.mark.parametrize("pred, gold", [("0.6", "\\frac{1}{2}"), ("x - 1", "x+1"), ("\\sqrt{3}", "\\sqrt{2}"),
                                        ("", "1"), ("nonsense words", "1")])
def test_math_mismatches(pred, gold):
    assert math_accuracy(tagged(pred), gold) == 0.0


def test_math_without_answer_tag_scores_zero():
    assert math_accuracy("the answer is 1/2", "\\frac{1}{2}") == 0.0
    assert math_accuracy("", "1") == 0.0


def test_math_on_a_huge_response_without_answer_is_fast():
    assert math_accuracy("<think>" + "x" * 1_000_000, "1") == 0.0


NUMS = {"numbers": [25, 5, 4, 2], "target": 40}


@pytest.mark.parametrize("expr, score", [
    ("(25 - 5) * 4 / 2", 1.0),
    ("(25 - 5) × 4 ÷ 2", 1.0),
    ("2 * 4 * 5 + 25 - 25", 0.0),  # 25 used twice
    ("(25 - 5) * 4 / 2 + 0", 0.0),  # a foreign number
    ("(25 - 5) * 4", 0.0),  # 2 unused
    ("(25 + 5) * 4 / 2", 0.0),  # wrong value
    ("25 / (5 - 5) * 4 * 2", 0.0),  # division by zero
    ("a + 25 - 5 * 4 / 2", 0.0),  # letters
    ("__import__('os').system('true')", 0.0),
    ("(25 - 5) * 4 / 2 = 40", 0.0),  # an equation, not an expression
    ("", 0.0),
])
def test_countdown(expr, score):
    assert countdown_accuracy(tagged(expr), "40", NUMS) == score


def test_countdown_non_integer_intermediate_is_fine():
    meta = {"numbers": [3, 4, 6], "target": 8}
    assert countdown_accuracy(tagged("(3 / 6) * 4 * 4"), "8", meta) == 0.0  # 4 twice
    assert countdown_accuracy(tagged("4 / (3 / 6)"), "8", meta) == 1.0  # 3/6 = 1/2 on the way


def test_countdown_repeated_given_numbers_are_a_multiset():
    meta = {"numbers": [2, 2, 10], "target": 14}
    assert countdown_accuracy(tagged("10 + 2 + 2"), "14", meta) == 1.0
    assert countdown_accuracy(tagged("10 + 2 * 2 / 2 * 2"), "14", meta) == 0.0


def test_countdown_target_from_answer_and_bad_metadata():
    assert countdown_accuracy(tagged("1 + 2"), "3", {"numbers": [1, 2]}) == 1.0
    with pytest.raises(ValueError, match="numbers"):
        countdown_accuracy(tagged("1 + 2"), "3", {})


def test_countdown_does_not_evaluate_code(monkeypatch):
    import builtins
    monkeypatch.setattr(builtins, "__import__", lambda *a, **k: pytest.fail("imported something"))
    assert countdown_accuracy(tagged("__import__('os')"), "3", {"numbers": [1, 2], "target": 3}) == 0.0


@pytest.mark.parametrize("source, response, answer, meta, score", [
    ("countdown", tagged("1 + 2"), "3", {"numbers": [1, 2], "target": 3}, 1.0),
    ("arithmetic", tagged("3.0"), "3", {}, 1.0),
    ("arithmetic", tagged("\\frac{6}{2}"), "3", {}, 0.0),  # arithmetic wants a plain number
    ("math", tagged("\\frac{6}{2}"), "3", {}, 1.0),
    ("my_dataset", tagged("0.5"), "1/2", {}, 1.0),  # numeric fast path
])
def test_dispatch(source, response, answer, meta, score):
    sample = RewardInput(response=response, answer=answer, data_source=source, metadata=meta)
    assert accuracy(sample) == score
