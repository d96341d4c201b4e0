"""Tag extraction and the format reward."""

import pytest

from r1mega.rewards.format import format_reward
from r1mega.rewards.tags import extract_answer, extract_think, strip_tags

GOOD = " <think> 2 + 2 is 4 </think> <answer> 4 </answer>"


def test_extract_well_formed():
    assert extract_answer(GOOD) == "4"
    assert extract_think(GOOD) == "2 + 2 is 4"


@pytest.mark.parametrize("text", ["", "no tags at all", "<answer>4", "4</answer>", "<think>x"])
def test_missing_tags(text):
    assert extract_answer(text) is None
    assert extract_think(text) is None


def test_last_answer_wins():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    # an unclosed later answer does not hide the closed one before it
    assert extract_answer("<answer>1</answer> <answer>2") == "1"
    assert extract_answer("<answer>1<answer>2</answer>") == "2"


def test_nested_think_keeps_the_whole_span():
    assert extract_think("<think><think>a</think></think>") == "<think>a</think>"
    assert extract_think("<think>a</think> <think>b</think>") == "a</think> <think>b"


def test_answer_before_think_is_still_extracted():
    text = "<answer>7</answer><think>hmm</think>"
    assert extract_answer(text) == "7"
    assert extract_think(text) == "hmm"


def test_unicode():
    assert extract_answer("<think>思考</think><answer>答案 ½</answer>") == "答案 ½"


def test_strip_tags():
    assert strip_tags("<think>a</think><answer>b</answer>").split() == ["a", "b"]


def test_huge_input_of_near_miss_tags():
    text = "<think>" * 200_000 + "</answer>" * 100_000  # about 2.3 MB (benchmarks/rewards times it)
    assert extract_answer(text) is None
    assert extract_think(text) is None
    assert format_reward(text) == 0.0


@pytest.mark.parametrize("text", [
    GOOD,
    "<think></think><answer></answer>",
    "\n\t<think>\nmulti\nline\n</think>\n\n<answer>\n42\n</answer>\n",
    "<think>数学</think><answer>答</answer>",
])
def test_format_accepts(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    "",
    "4",
    "<think>a</think>",  # no answer
    "<answer>4</answer>",  # no think
    "<answer>4</answer><think>a</think>",  # answer before think
    "<think><think>a</think></think><answer>4</answer>",  # nested think
    "<think>a</think><answer>1</answer><answer>2</answer>",  # two answers
    "<think>a</think> so <answer>4</answer>",  # text between the blocks
    "lead <think>a</think><answer>4</answer>",  # text before
    "<think>a</think><answer>4</answer> trailing",  # text after
    "<think>a <answer>4</answer> </think>",  # answer inside think
    "<think>a</think><answer>4 </think></answer>",  # stray tag inside answer
    "<think>a</think><answer>4",  # truncated
])
def test_format_rejects(text):
    assert format_reward(text) == 0.0
