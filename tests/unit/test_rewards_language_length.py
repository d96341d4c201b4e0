"""Language consistency and the DAPO overlong penalty."""

import pytest

from r1mega.rewards.language import language_consistency, words
from r1mega.rewards.length import overlong_penalty


def test_words_segmentation():
    assert words("Hello, world! 42 apples") == ["Hello", "world", "apples"]
    assert words("我喜欢 math") == ["我", "喜", "欢", "math"]
    assert words("hello世界") == ["hello", "世", "界"]
    assert words("3.14 + 2 = 5.14 !!! ___") == []


def test_pure_english_and_pure_chinese():
    en = "<think>First add the numbers, then divide.</think><answer>4</answer>"
    zh = "<think>先把数字相加，然后除以二。</think><answer>4</answer>"
    assert language_consistency(en, "en") == 1.0
    assert language_consistency(en, "zh") == 0.0
    assert language_consistency(zh, "zh") == 1.0
    assert language_consistency(zh, "en") == 0.0


def test_mixed_share():
    # words: I, like, 苹, 果, and, 香, 蕉 -> 3 Latin of 7, 4 Han of 7
    text = "<think>I like 苹果 and 香蕉</think><answer>x</answer>"
    assert language_consistency(text, "en") == pytest.approx(3 / 7)
    assert language_consistency(text, "zh") == pytest.approx(4 / 7)


def test_only_the_reasoning_counts():
    text = "<think>reasoning in English</think><answer>答案是四</answer>"
    assert language_consistency(text, "en") == 1.0


def test_whole_response_without_think_and_tags_are_not_words():
    assert language_consistency("just some english", "en") == 1.0
    assert language_consistency("<answer>中文</answer>", "zh") == 1.0  # the tag names are not words
    assert language_consistency("<think>中文", "zh") == 1.0  # unclosed think: whole response


def test_accents_are_latin_and_other_scripts_are_not():
    assert language_consistency("<think>naïve café résumé</think>", "en") == 1.0
    assert language_consistency("<think>hello привет</think>", "en") == 0.5


@pytest.mark.parametrize("text", ["", "<think></think>", "<think>1 + 2 = 3; 4 * 5 = 20.</think>", "   "])
def test_no_words_scores_one(text):
    assert language_consistency(text, "en") == 1.0
    assert language_consistency(text, "zh") == 1.0


def test_unknown_language():
    with pytest.raises(ValueError, match="known: en, zh"):
        language_consistency("x", "klingon")


def test_huge_response():
    text = "<think>" + "word 字 " * 150_000 + "</think>"  # about 1 MB (benchmarks/rewards times it)
    assert language_consistency(text, "en") == pytest.approx(0.5)


@pytest.mark.parametrize("tokens, value", [
    (0, 0.0), (50, 0.0), (80, 0.0),  # L <= max - cache
    (81, -1 / 20), (90, -0.5), (99, -19 / 20), (100, -1.0),  # linear in (max - cache, max]
    (101, -1.0), (10_000, -1.0),  # beyond max
])
def test_overlong_regions(tokens, value):
    assert overlong_penalty(tokens, 100, 20) == pytest.approx(value)


def test_overlong_edges():
    assert overlong_penalty(100, 100, 0) == 0.0  # no cache: only beyond max is punished
    assert overlong_penalty(101, 100, 0) == -1.0
    assert overlong_penalty(0, 100, 100) == 0.0
    assert overlong_penalty(1, 100, 100) == pytest.approx(-0.01)


@pytest.mark.parametrize("args, message", [
    ((10, 0, 0), "max_tokens"), ((10, 100, -1), "cache_tokens"), ((10, 100, 101), "cache_tokens"),
    ((-1, 100, 10), "num_tokens"),
])
def test_overlong_validates(args, message):
    with pytest.raises(ValueError, match=message):
        overlong_penalty(*args)
