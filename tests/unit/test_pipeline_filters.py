"""Rejection-sampling filters: each rule, duplicates, the per-prompt cap, statistics per source."""

import pytest

from r1mega.recipe.filters import Candidate, FilterRules, merge_stats, reject_reason, select

GOOD = {"accuracy": 1.0, "format": 1.0, "language": 1.0}


def cand(prompt_id="p1", response="<think> a </think> <answer> 1 </answer>", rewards=None, tokens=10,
         finished=True, source="math", index=0):
    return Candidate(prompt_id, source, "q", response, tokens, finished, dict(GOOD if rewards is None else rewards), index)


@pytest.mark.parametrize("change, reason", [
    ({"rewards": {**GOOD, "accuracy": 0.0}}, "incorrect"),
    ({"rewards": {**GOOD, "format": 0.5}}, "malformed"),
    ({"rewards": {**GOOD, "language": 0.8}}, "language_mixing"),
    ({"tokens": 65}, "too_long"),
    ({"finished": False}, "unfinished"),
    ({}, None),
])
def test_each_rule(change, reason):
    assert reject_reason(cand(**change), FilterRules(max_response_tokens=64)) == reason


def test_first_broken_rule_is_reported_and_thresholds_apply():
    bad = cand(rewards={"accuracy": 0.0, "format": 0.0, "language": 0.0}, finished=False)
    assert reject_reason(bad, FilterRules()) == "incorrect"
    loose = FilterRules(min_accuracy=0.0, min_format=0.0, min_language=0.0, max_response_tokens=None)
    assert reject_reason(cand(rewards={}, tokens=10_000), loose) is None
    assert reject_reason(cand(rewards={}), FilterRules()) == "incorrect"  # a missing score is no pass


def test_duplicates_are_dropped_per_prompt_and_cap_keeps_the_first_m():
    data = [cand(response="<think> a </think>  <answer> 1 </answer>", index=0),
            cand(response=" <think> a </think> <answer> 1 </answer>\n", index=1),  # same after whitespace
            cand(response="<think> b </think> <answer> 1 </answer>", index=2),
            cand(response="<think> c </think> <answer> 1 </answer>", index=3),
            cand(prompt_id="p2", index=0),  # the same text for another prompt is no duplicate
            cand(prompt_id="p2", rewards={**GOOD, "accuracy": 0.0}, index=1)]
    kept, stats = select(data, FilterRules(keep_per_prompt=2))
    assert [(c.prompt_id, c.sample_index) for c in kept] == [("p1", 0), ("p1", 2), ("p2", 0)]
    s = stats["math"]
    assert (s["prompts"], s["samples"], s["accepted"], s["kept"], s["prompts_kept"]) == (2, 6, 5, 3, 2)
    assert s["rejected"]["duplicate"] == 1 and s["rejected"]["over_cap"] == 1 and s["rejected"]["incorrect"] == 1
    assert s["acceptance_rate"] == pytest.approx(5 / 6)
    kept_all, _ = select(data, FilterRules(keep_per_prompt=4, dedupe=False))
    assert len(kept_all) == 5


def test_statistics_per_data_source_and_in_total():
    data = [cand("a", source="math"), cand("a", source="math", rewards={**GOOD, "format": 0.0}, index=1),
            cand("b", source="code", finished=False), cand("c", source="code")]
    kept, stats = select(data, FilterRules(keep_per_prompt=1))
    assert [c.prompt_id for c in kept] == ["a", "c"]
    assert stats["math"]["acceptance_rate"] == 0.5 and stats["code"]["acceptance_rate"] == 0.5
    assert stats["code"]["rejected"]["unfinished"] == 1 and stats["code"]["prompt_coverage"] == 0.5
    assert stats["all"]["samples"] == 4 and stats["all"]["kept"] == 2 and stats["all"]["prompts"] == 3


def test_statistics_of_shards_merge_to_those_of_the_whole():
    data = [cand("a", source="math"), cand("a", source="math", rewards={**GOOD, "format": 0.0}, index=1),
            cand("b", source="code", finished=False), cand("c", source="code"), cand("d", source="math")]
    rules = FilterRules(keep_per_prompt=1)
    _, whole = select(data, rules)
    _, first = select(data[:3], rules)  # shards split between prompts, as data-parallel ranks do
    _, second = select(data[3:], rules)
    assert merge_stats([first, second]) == whole
