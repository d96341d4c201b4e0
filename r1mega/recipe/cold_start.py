"""Built-in SFT conversations for the miniature R1 pipeline on the built-in tasks.

R1's cold start is a few thousand long, readable reasoning traces; here they are correct
worked solutions of the train split (column-by-column additions for 2-digit sums), never of
the held-out split. The non-reasoning conversations stand in for R1's writing and QA data:
a short transformation answered without reasoning, mixed into the rejection-sampling SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator

import numpy as np

from r1mega.config.schema import R1Config
from r1mega.data.conversations import conversation_row
from r1mega.data.corpus import worked_response
from r1mega.data.tasks import make_task
from r1mega.recipe.jsonl import write_json, write_jsonl

TRACES_FILE = "cold_start.jsonl"
GENERAL_FILE = "general.jsonl"


def traces(cfg: R1Config) -> Iterator[Dict]:
    c = cfg.cold_start
    rng = np.random.default_rng([c.seed, 1])
    records = make_task(cfg.data.name, "train", c.traces, c.seed, **dict(cfg.data.difficulty))
    for r in records:
        yield conversation_row(f"cold-{r.prompt_id}", r.prompt, worked_response(r, True, rng), r.data_source,
                               {"source": "cold_start", "answer": r.answer})


def general(cfg: R1Config) -> Iterator[Dict]:
    """Digit strings to reverse: an answer with an empty reasoning block."""
    c = cfg.cold_start
    rng = np.random.default_rng([c.seed, 2])
    for i in range(c.general):
        digits = " ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 7))))
        answer = " ".join(reversed(digits.split()))
        yield conversation_row(f"general-{i}", f"Write the digits {digits} in reverse order",
                               f" <think> </think> <answer> {answer} </answer>", "general", {"source": "general"})


def write(cfg: R1Config) -> Dict[str, int]:
    """Both files into trainer.output_dir; their row counts (also in data_stats.json)."""
    out = Path(cfg.trainer.output_dir)
    stats = {TRACES_FILE: write_jsonl(out / TRACES_FILE, traces(cfg)),
             GENERAL_FILE: write_jsonl(out / GENERAL_FILE, general(cfg))}
    write_json(out / "data_stats.json", stats)
    return stats
