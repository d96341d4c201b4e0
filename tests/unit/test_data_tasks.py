"""Built-in generated tasks: correct answers, determinism, disjoint splits, difficulty knobs."""

import re
from collections import Counter
from fractions import Fraction

import pytest

from r1mega.data.prompts import load_prompts
from r1mega.data.tasks import make_task, problem_key, write_task


def evaluate(expression: str):
    """(exact value, numbers used) of + - * / ( ) over integers: a recursive-descent parser."""
    tokens = re.findall(r"\d+|[-+*/()]", expression)
    assert "".join(tokens) == expression.replace(" ", ""), expression
    numbers, pos = [], 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom():
        if peek() == "(":
            take()
            value = expr()
            assert take() == ")"
            return value
        numbers.append(int(take()))
        return Fraction(numbers[-1])

    def term():
        value = atom()
        while peek() in ("*", "/"):
            value = value * atom() if take() == "*" else value / atom()
        return value

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    value = expr()
    assert pos == len(tokens), expression
    return value, numbers


def test_evaluator():
    assert evaluate("(1 + 2) / 3") == (1, [1, 2, 3])
    assert evaluate("20 - (20 - 3) * 2") == (-14, [20, 20, 3, 2])
    assert evaluate("8 / 3 * 3") == (8, [8, 3, 3])


def test_countdown_answers_reach_the_target():
    for split in ("train", "test"):
        for r in make_task("countdown", split, 300, seed=5):
            value, used = evaluate(r.answer)
            m = r.metadata
            assert value == m["target"] and Counter(used) == Counter(m["numbers"]), r
            assert 3 <= len(m["numbers"]) <= 4 and all(1 <= n <= 20 for n in m["numbers"])
            assert 1 <= m["target"] <= 100 and r.data_source == "countdown"
            assert r.prompt.startswith(f"Using the numbers {m['numbers']}, create an equation that equals "
                                       f"{m['target']}. You can use basic arithmetic operations")


def test_arithmetic_answers():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for r in make_task("arithmetic", "train", 300, seed=5):
        m = r.metadata
        assert r.prompt == f"What is {m['a']} {m['op']} {m['b']}?" and r.data_source == "arithmetic"
        assert r.answer == str(ops[m["op"]](m["a"], m["b"])) and int(r.answer) >= 0


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "code"])
def test_deterministic(name):
    a = make_task(name, "train", 200, seed=11)
    assert a == make_task(name, "train", 200, seed=11)
    assert [r.prompt for r in a] != [r.prompt for r in make_task(name, "train", 200, seed=12)]
    assert len({r.prompt_id for r in a + make_task(name, "test", 50, seed=11)}) == 250


@pytest.mark.parametrize("name,knobs", [("arithmetic", {}), ("arithmetic", {"digits": 1, "ops": "+"}),
                                        ("countdown", {}), ("countdown", {"count": 3, "max_number": 6}),
                                        ("code", {}), ("code", {"families": "plus,mod"})])
def test_held_out_split_is_disjoint(name, knobs):
    test = make_task(name, "test", 5 if knobs else 200, seed=0, **knobs)
    test_keys = {problem_key(r) for r in test}
    assert len(test_keys) == len(test)  # no repeats within the held-out split
    for seed in (0, 1):  # whatever the train seed
        train = make_task(name, "train", 3000, seed=seed, **knobs)
        assert not test_keys & {problem_key(r) for r in train}


def test_commuted_problems_share_a_split():
    test = make_task("arithmetic", "test", 4, seed=0, digits=1, ops="+")
    train = make_task("arithmetic", "train", 2000, seed=0, digits=1, ops="+")
    held_out = {frozenset((r.metadata["a"], r.metadata["b"])) for r in test}
    assert not held_out & {frozenset((r.metadata["a"], r.metadata["b"])) for r in train}


def test_difficulty_knobs():
    hard = make_task("arithmetic", "train", 200, seed=0, digits=4, min_digits=4, ops="*")
    assert all(1000 <= r.metadata[k] <= 9999 for r in hard for k in "ab")
    assert {r.metadata["op"] for r in hard} == {"*"}
    default = make_task("arithmetic", "train", 200, seed=0)
    assert max(r.metadata["a"] for r in default) < 100 and {r.metadata["op"] for r in default} == set("+-*")
    four = make_task("countdown", "train", 100, seed=0, count=4, max_number=50, max_target=500)
    assert all(len(r.metadata["numbers"]) == 4 for r in four)
    assert max(r.metadata["target"] for r in four) > 100
    assert max(max(r.metadata["numbers"]) for r in four) > 20
    small = make_task("countdown", "train", 100, seed=0, count=[2, 3], max_number=5, max_target=10)
    assert {len(r.metadata["numbers"]) for r in small} == {2, 3}
    assert all(n <= 5 for r in small for n in r.metadata["numbers"]) and all(
        r.metadata["target"] <= 10 for r in small)


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown built-in task 'gsm8k'; known: arithmetic, countdown"):
        make_task("gsm8k", "train", 1, seed=0)
    with pytest.raises(ValueError, match="split"):
        make_task("arithmetic", "dev", 1, seed=0)
    with pytest.raises(ValueError, match=r"unknown difficulty knob\(s\) \['digit'\]; known: digits"):
        make_task("arithmetic", "train", 1, seed=0, digit=3)
    with pytest.raises(ValueError, match="ops"):
        make_task("arithmetic", "train", 1, seed=0, ops="/")
    with pytest.raises(ValueError, match="count"):
        make_task("countdown", "train", 1, seed=0, count=1)
    with pytest.raises(ValueError, match="only .* distinct test problems"):
        make_task("arithmetic", "test", 50, seed=0, digits=1, ops="+")


def test_write_task_round_trips(tmp_path):
    records = make_task("countdown", "test", 30, seed=2) + make_task("arithmetic", "test", 30, seed=2)
    assert load_prompts(write_task(records, tmp_path / "tasks.jsonl"), on_bad_row="error") == records
