"""The built-in code task: problems, their hidden tests (checked in the real sandbox: every right program
passes, every listed slip fails one), and the base-model corpus's worked programs."""

from __future__ import annotations


import numpy as np
import pytest

from r1mega.data.code_task import FAMILIES, TESTS, hidden_tests, worked_program, wrong_programs
from r1mega.data.corpus import worked_response
from r1mega.data.tasks import make_task
from r1mega.rewards.code import extract_code, run_tests
from r1mega.rewards.sandbox import Limits, bwrap_path, check_available, claim_slots

SLOT = claim_slots()  # slots of this test process's own: no other process of the host uses them


@pytest.fixture(scope="module")
def bwrap():
    path = bwrap_path()
    check_available(path)
    return path


def test_problems_carry_their_tests_and_a_reference():
    for r in make_task("code", "test", 50, seed=3):
        m = r.metadata
        family = FAMILIES[m["family"]]
        assert r.data_source == "code" and r.prompt.startswith("Write a Python program that reads")
        assert m["tests"] == hidden_tests(m["family"], m["k"])  # the same problem always has the same tests
        assert len(m["tests"]["inputs"]) == len(m["tests"]["outputs"]) == TESTS
        for given, expected in zip(m["tests"]["inputs"], m["tests"]["outputs"]):
            assert expected == family.solve(given.strip(), m["k"]) + "\n"


def test_unknown_families_are_named():
    with pytest.raises(ValueError, match="unknown families.*'sort'"):
        make_task("code", "train", 1, seed=0, families="plus,sort")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_right_program_passes_and_every_slip_fails(bwrap, family):
    params = FAMILIES[family].params
    for k in (params[0], params[len(params) // 2], params[-1]):
        tests = hidden_tests(family, k)
        right = FAMILIES[family].right.format(k=k)
        assert run_tests(bwrap, right, tests, "python", Limits(wall_s=10), 60, (SLOT,)).passed == TESTS
        for wrong in wrong_programs(family, k):
            report = run_tests(bwrap, wrong, tests, "python", Limits(wall_s=10), 60, (SLOT,))
            assert report.passed < TESTS, f"{family} k={k}: {wrong!r} passes every hidden test"


def test_worked_programs_are_fenced_and_wrong_ones_differ():
    rng = np.random.default_rng(0)
    for r in make_task("code", "train", 100, seed=1):
        right = worked_response(r, True, rng)
        wrong = worked_response(r, False, rng)
        assert extract_code(right, "python").strip() == r.answer
        assert extract_code(wrong, "python").strip() in wrong_programs(r.metadata["family"], r.metadata["k"])
        assert right.startswith(" <think> ") and right.endswith("\n```")
        assert worked_program(r, True, rng) == right
