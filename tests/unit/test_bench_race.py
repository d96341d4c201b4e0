"""The race's bookkeeping: when a curve first reaches a target, the median over runs (a run that never
got there counts as slowest), and the Markdown table of a result with targets reached and not."""

from __future__ import annotations

from r1mega.bench.peer import _median_time, reached
from r1mega.bench.report import _peer_md

FAST = [[0, 0.0, 0.5], [5, 10.0, 0.86], [10, 20.0, 0.93]]
SLOW = [[0, 0.0, 0.5], [5, 12.0, 0.7], [10, 25.0, 0.88]]


def test_first_evaluation_at_or_above_the_target():
    assert reached(FAST, 0.85) == {"step": 5, "seconds": 10.0}
    assert reached(FAST, 0.93) == {"step": 10, "seconds": 20.0}
    assert reached(SLOW, 0.9) is None


def test_median_over_runs_counts_a_miss_as_slowest():
    hits = [reached(c, 0.85) for c in (FAST, SLOW, SLOW)]
    assert _median_time(hits) == {"seconds": 25.0, "step": 10, "reached": 3}
    assert _median_time([reached(c, 0.9) for c in (FAST, SLOW, SLOW)]) is None  # two of three never did
    assert _median_time([reached(c, 0.9) for c in (FAST, FAST, SLOW)]) == {"seconds": 20.0, "step": 10, "reached": 2}


def test_table_names_times_steps_and_misses():
    side = {"runs": [{"curve": FAST, "step_s": [2.0]}], "step_s_median": 2.0, "final_accuracy": 0.93,
            "train_s": 20.0, "phase_share": {"update": 0.5, "generate": 0.3}}
    result = {"model": "tiny", "algorithm": "grpo", "prompts_per_step": 16, "group_size": 8, "max_new_tokens": 48,
              "lr": 5e-5, "steps": 10, "eval_every": 5, "held_out": 200, "runs": 1, "trl_version": "1.16.0",
              "r1mega": side, "r1mega_async": side, "trl": {**side, "phase_share": {}},
              "targets": {"0.85": {"r1mega": {"seconds": 10.0, "step": 5, "reached": 1},
                                   "r1mega_async": {"seconds": 8.0, "step": 5, "reached": 1},
                                   "trl": {"seconds": 20.0, "step": 10, "reached": 1},
                                   "time_ratio_trl_over_r1mega": 2.0, "time_ratio_sync_over_async": 1.25},
                          "0.99": {"r1mega": None, "r1mega_async": None, "trl": None,
                                   "time_ratio_trl_over_r1mega": None, "time_ratio_sync_over_async": None}}}
    md = _peer_md(result)
    assert "| r1mega | 10 s (step 5; 1/1 runs) | not reached |" in md
    assert "| r1mega, async (1 trainer rank + 1 worker) | 8 s (step 5; 1/1 runs) | not reached |" in md
    assert "85%: **2.00x**" in md and "update 50%, generate 30%" in md
    assert "r1mega's / r1mega async's: 85%: **1.25x**" in md
