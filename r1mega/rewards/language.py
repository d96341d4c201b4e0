"""Language consistency (R1): the share of the reasoning's words written in the target language.

A word is a run of letters (digits, punctuation and symbols are not words); each Han
character counts as a word of its own, as written Chinese has no spaces between words.
A word is in the target language when all its letters are in that language's script; a
reasoning without any word scores 1.0, as nothing in it mixes languages.
"""

from __future__ import annotations

import re

from r1mega.rewards.tags import extract_think, strip_tags

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
# one Han character, or a maximal run of other letters ([^\W\d_] is "letter")
_WORD = re.compile(f"[{_HAN}]|(?:(?![{_HAN}])[^\\W\\d_])+")
_SCRIPTS: dict[str, re.Pattern[str]] = {
    "en": re.compile(f"[{_LATIN}]+"),
    "zh": re.compile(f"[{_HAN}]"),
}
LANGUAGES = tuple(_SCRIPTS)


def words(text: str) -> list[str]:
    """The words of a text: Han characters one by one, runs of other letters whole."""
    return _WORD.findall(text)


def language_consistency(response: str, target: str = "en") -> float:
    """Share of words of the <think> part (the whole response without one) in the target script."""
    if target not in _SCRIPTS:
        raise ValueError(f"unknown target language {target!r}; known: {', '.join(LANGUAGES)}")
    think = extract_think(response)
    found = words(strip_tags(response if think is None else think))
    if not found:  # no words at all (empty, or only numbers): nothing in it mixes languages
        return 1.0
    script = _SCRIPTS[target]
    return sum(1 for w in found if script.fullmatch(w)) / len(found)
