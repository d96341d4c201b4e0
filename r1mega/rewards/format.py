"""Format reward: exactly one <think>...</think> followed by exactly one <answer>...</answer>."""

from __future__ import annotations

from r1mega.rewards.tags import ANSWER, ANSWER_END, TAGS, THINK, THINK_END


def format_reward(response: str) -> float:
    """1.0 for `<think> ... </think> <answer> ... </answer>` with only whitespace around, else 0.0."""
    text = response.strip()
    if not text.startswith(THINK) or not text.endswith(ANSWER_END):
        return 0.0
    if any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    think_end, answer = text.find(THINK_END), text.find(ANSWER)
    if answer < think_end:
        return 0.0
    return 1.0 if text[think_end + len(THINK_END):answer].strip() == "" else 0.0
