"""Rejection-sampling filters: which generated responses become SFT data, and the statistics.

A response is kept when it is correct, well-formed, in one language, within the length cap
and finished (not cut off); among the accepted responses to one prompt, repeats are dropped
and at most m are kept. Every rejection is counted under the first rule it breaks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

REASONS = ("incorrect", "malformed", "language_mixing", "too_long", "unfinished", "duplicate", "over_cap")


@dataclass
class Candidate:
    """One generated response with what the filters look at."""

    prompt_id: str
    data_source: str
    prompt: str  # the user's text
    response: str
    response_tokens: int
    finished: bool  # ended with EOS or a stop string, not at the length limit
    rewards: Dict[str, float]  # unweighted component scores
    sample_index: int = 0


@dataclass(frozen=True)
class FilterRules:
    min_accuracy: float = 1.0
    min_format: float = 1.0
    min_language: float = 0.95
    max_response_tokens: Optional[int] = None
    dedupe: bool = True
    keep_per_prompt: int = 2


def reject_reason(c: Candidate, rules: FilterRules) -> Optional[str]:
    """The first per-sample rule the candidate breaks, or None."""
    if c.rewards.get("accuracy", 0.0) < rules.min_accuracy:
        return "incorrect"
    if c.rewards.get("format", 0.0) < rules.min_format:
        return "malformed"
    if c.rewards.get("language", 0.0) < rules.min_language:
        return "language_mixing"
    if rules.max_response_tokens is not None and c.response_tokens > rules.max_response_tokens:
        return "too_long"
    if not c.finished:
        return "unfinished"
    return None


def normalise(text: str) -> str:
    """The text duplicates are compared by: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


@dataclass
class SourceStats:
    prompts: int = 0
    samples: int = 0
    accepted: int = 0  # passed every per-sample rule
    kept: int = 0
    prompts_kept: int = 0  # prompts with at least one kept response
    response_tokens: int = 0  # tokens the model generated, every sample's (kept or not)
    rejected: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def as_dict(self) -> Dict[str, object]:
        return {"prompts": self.prompts, "samples": self.samples, "accepted": self.accepted, "kept": self.kept,
                "prompts_kept": self.prompts_kept, "response_tokens": self.response_tokens,
                "rejected": dict(self.rejected),
                "acceptance_rate": self.accepted / self.samples if self.samples else 0.0,
                "prompt_coverage": self.prompts_kept / self.prompts if self.prompts else 0.0}


def select(candidates: Sequence[Candidate], rules: FilterRules) -> Tuple[List[Candidate], Dict[str, dict]]:
    """Kept candidates (in input order) and statistics per data source (plus 'all')."""
    by_prompt: Dict[str, List[Candidate]] = defaultdict(list)
    for c in candidates:
        by_prompt[c.prompt_id].append(c)
    stats: Dict[str, SourceStats] = defaultdict(SourceStats)
    kept: List[Candidate] = []
    for group in by_prompt.values():
        source = stats[group[0].data_source]
        source.prompts += 1
        seen, mine = set(), []
        for c in group:
            source.samples += 1
            source.response_tokens += c.response_tokens
            reason = reject_reason(c, rules)
            if reason is None:
                source.accepted += 1
                key = normalise(c.response)
                if rules.dedupe and key in seen:
                    reason = "duplicate"
                elif len(mine) >= rules.keep_per_prompt:
                    reason = "over_cap"
                else:
                    seen.add(key)
                    mine.append(c)
            if reason is not None:
                source.rejected[reason] += 1
        source.kept += len(mine)
        source.prompts_kept += bool(mine)
        kept += mine
    order = {id(c): i for i, c in enumerate(candidates)}
    kept.sort(key=lambda c: order[id(c)])
    return kept, _with_total(stats)


COUNTS = ("prompts", "samples", "accepted", "kept", "prompts_kept", "response_tokens")


def _add(into: SourceStats, counts: Dict) -> None:
    for key in COUNTS:
        setattr(into, key, getattr(into, key) + counts[key])
    for reason, count in counts["rejected"].items():
        into.rejected[reason] += count


def _with_total(stats: Dict[str, SourceStats]) -> Dict[str, dict]:
    total = SourceStats()
    for s in stats.values():
        _add(total, s.as_dict())
    return {**{name: s.as_dict() for name, s in sorted(stats.items())}, "all": total.as_dict()}


def merge_stats(parts: Sequence[Dict[str, dict]]) -> Dict[str, dict]:
    """The statistics of several shards of prompts (each as select() gives them) as one."""
    merged: Dict[str, SourceStats] = defaultdict(SourceStats)
    for part in parts:
        for name, counts in part.items():
            if name != "all":
                _add(merged[name], counts)
    return _with_total(merged)
