"""Reward scoring speed on the CPU: the reward stack on a batch of short honest answers and on a
batch of hostile ones, and the worst inputs of the pieces it is built from (the arithmetic
checker at its limits, tag extraction and the language reward on megabyte responses, the
built-in tokenizer's construction). The tests check what these inputs score; how long they take
is measured here, so a slow or loaded machine never changes a test's verdict.

Reports the median of REPEATS runs per case (time.perf_counter) and writes
benchmarks/results/rewards.json. Usage: python benchmarks/rewards/bench_rewards.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

REPEATS = 5


def _median_s(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()  # warm: worker start-up, imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases() -> Dict[str, Callable[[], object]]:
    from r1mega.data.tokenizer import build_tiny_tokenizer
    from r1mega.rewards import arith
    from r1mega.rewards.format import format_reward
    from r1mega.rewards.language import language_consistency
    from r1mega.rewards.stack import RewardInput, RewardStack
    from r1mega.rewards.tags import extract_answer, extract_think

    stack = RewardStack({"accuracy": 1.0, "format": 0.1, "language": 0.1}, timeout_s=0.5, num_workers=2)
    honest = [RewardInput(response=f" <think> {i} + 1 </think> <answer> {i + 1} </answer>", answer=str(i + 1),
                          data_source="arithmetic") for i in range(512)]
    towers = ["\\frac{" * 500, "{" * 2000 + "}" * 2000, "x^" * 300 + "2", "\\sqrt{" * 200]
    hostile = [RewardInput(response=f"<think>t</think><answer>{h}</answer>", answer="4", data_source="math")
               for h in towers]
    hostile.append(RewardInput(response="<think>" + "y" * 1_000_000 + "</think><answer>4</answer>", answer="4",
                               data_source="math"))
    big = "9" * arith.MAX_DIGITS
    worst = ["*".join([big] * 16), "/".join([big] * 16), "+".join(["1/7"] * 60), "1/(" * 10 + "3" + ")" * 10]
    near_miss = "<think>" * 200_000 + "</answer>" * 100_000
    mixed = "<think>" + "word 字 " * 150_000 + "</think>"
    folder = Path(tempfile.mkdtemp(prefix="r1mega-bench-tok-"))
    return {
        "reward stack, 512 short answers (2 workers)": lambda: stack.score(honest),
        "reward stack, 4 sympy brace towers + a 1 MB answer (timeout 0.5 s)": lambda: stack.score(hostile),
        "arithmetic checker, 4 worst expressions at its limits": lambda: [arith.evaluate(e[: arith.MAX_CHARS])
                                                                          for e in worst],
        "tags and format, 2.3 MB of near-miss tags": lambda: (extract_answer(near_miss), extract_think(near_miss),
                                                             format_reward(near_miss)),
        "language reward, 1 MB mixed-script answer": lambda: language_consistency(mixed, "en"),
        "built-in tokenizer, built (vocab 256)": lambda: build_tiny_tokenizer(folder / "tok", vocab_size=256),
    }, stack


def main() -> None:
    from r1mega.bench.measure import environment

    table, stack = cases()
    rows = []
    try:
        for name, fn in table.items():
            seconds = _median_s(fn)
            rows.append({"case": name, "median_s": seconds})
            print(f"| {name} | {seconds * 1e3:.1f} ms |", flush=True)
    finally:
        stack.close()
    out = Path(__file__).resolve().parents[1] / "results" / "rewards.json"
    out.write_text(json.dumps({"environment": environment(), "repeats": REPEATS, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
