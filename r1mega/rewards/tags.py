"""The <think> and <answer> parts of a response, found in linear time (str.find, no regex)."""

from __future__ import annotations

THINK, THINK_END = "<think>", "</think>"
ANSWER, ANSWER_END = "<answer>", "</answer>"
TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)


def extract_answer(response: str) -> str | None:
    """Content of the last closed <answer>...</answer>, stripped; None if there is none."""
    end = response.rfind(ANSWER_END)
    if end < 0:
        return None
    # the opening tag nearest the last closing one: the last of several answers wins
    start = response.rfind(ANSWER, 0, end)
    if start < 0:
        return None
    return response[start + len(ANSWER):end].strip()


def extract_think(response: str) -> str | None:
    """Text from the first <think> to the last </think> after it, stripped; None if either is missing."""
    start = response.find(THINK)
    if start < 0:
        return None
    # the whole reasoning span, so repeated or nested think blocks are all kept
    end = response.rfind(THINK_END, start + len(THINK))
    if end < 0:
        return None
    return response[start + len(THINK):end].strip()


def strip_tags(text: str) -> str:
    """The text with every think/answer tag replaced by a space."""
    for tag in TAGS:
        text = text.replace(tag, " ")
    return text
