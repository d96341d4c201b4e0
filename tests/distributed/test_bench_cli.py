"""`r1mega-bench` runs every suite at a tiny size and writes well-formed results (timings are
never checked here: they live in benchmarks/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.head_dim=16", "data.train_size=32", "data.test_size=4",
    "data.prompts_per_step=2", "algorithm.group_size=2", "rollout.max_new_tokens=4", "reward.num_workers=0",
    "bench.warmup=1", "bench.repeats=1",
    "bench.train.models=[tiny_moe]", "bench.train.layouts=[{dp: 1},{dp: 2, ep: 2}]", "bench.train.seq_length=16",
    "bench.train.micro_batch_size=2", "bench.train.micro_batches=1",
    "bench.rollout.batch_sizes=[1,2]", "bench.rollout.new_tokens=3", "bench.rollout.prompt_median=4",
    "bench.rollout.prompt_p99=40",
    "bench.packing.rows=6", "bench.packing.prompt_tokens=4", "bench.packing.median_response=6",
    "bench.packing.p99_response=40", "bench.packing.longest_response=48", "trainer.micro_batch_tokens=64",
    "bench.peer.steps=2", "bench.peer.eval_every=1", "bench.peer.runs=1", "pretrain.steps=2", "pretrain.documents=64",
    "pretrain.seq_length=32", "bench.asynchronous.steps=2", "bench.asynchronous.runs=1",
]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_suite_writes_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.bench", *TINY, f"bench.output_dir={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["suites"]) == ["step", "train", "rollout", "packing", "peer", "async"]
    assert results["environment"]["device"] and results["command"].startswith("r1mega-bench ")

    step = results["suites"]["step"]
    assert all(_positive(step[k]) for k in ("step_s", "tokens_per_s", "samples_per_s", "model_gflops_per_token",
                                            "model_tflops_per_step"))
    assert set(step["phase_s"]) == {"sync", "generate", "score", "release", "advantages", "logprobs", "update"}
    assert step["mfu"] is None and _positive(step["peak_rss_mb"])  # no MFU on CPU

    train = {(r["model"], r["dp"], r["ep"]): r for r in results["suites"]["train"]["rows"]}
    assert set(train) == {("tiny_moe", 1, 1), ("tiny_moe", 2, 2)}
    assert train[("tiny_moe", 2, 2)]["ranks"] == 2
    assert all(_positive(r["tokens_per_s"]) and _positive(r["model_tflops_per_s"]) for r in train.values())
    assert train[("tiny_moe", 2, 2)]["tokens_per_step"] == 2 * train[("tiny_moe", 1, 1)]["tokens_per_step"]

    rollout = results["suites"]["rollout"]["rows"]
    native = [r for r in rollout if r["engine"] == "native"]
    assert [(r["prompts"], r["batch_size"]) for r in native] == [("task", 1), ("task", 2), ("long_tailed", 1),
                                                                  ("long_tailed", 2)]
    assert [r["generated_tokens"] for r in native] == [3, 6] * 2 and all(_positive(r["tokens_per_s"]) for r in native)
    assert all(0.0 < r["prefill_share"] < 1.0 for r in native)
    assert [r["prefill_padding_share"] for r in native if r["batch_size"] == 1] == [0.0, 0.0]  # one prompt: no padding
    assert all(0.0 <= r["prefill_padding_share"] <= r["unbucketed_prefill_padding_share"] < 1.0 for r in native)
    assert all(_positive(r["unbucketed_tokens_per_s"]) and _positive(r["bucketed_prefill_speedup"]) for r in native)
    assert [r["skipped"] for r in rollout if r["engine"] == "sglang"]
    partial = results["suites"]["rollout"]["partial"]  # a weight update halfway: cache kept or computed again
    assert [(r["prompts"], r["batch_size"]) for r in partial] == [("task", 2), ("long_tailed", 2)]
    assert all(_positive(r["keep_s"]) and _positive(r["recompute_s"]) and _positive(r["recompute_cost"])
               for r in partial)

    packing = results["suites"]["packing"]
    assert set(packing["sets"]) == {"long_tailed", "task"}
    for s in packing["sets"].values():
        assert s["rows"] == 6 and _positive(s["tokens"]) and _positive(s["speedup"])
        assert all(_positive(s[layout][k]) for layout in ("packed", "padded") for k in ("tokens_per_s", "update_s"))
        assert s["packed"]["padding_share"] == 0.0  # no sequence parallelism here: nothing to round up to
        assert s["packed"]["micro_batches"] <= s["padded"]["micro_batches"]
    assert packing["sets"]["long_tailed"]["padded"]["padding_share"] > 0  # rows of 2 to 48 tokens

    peer = results["suites"]["peer"]
    for side in ("r1mega", "r1mega_async", "trl"):
        (run,) = peer[side]["runs"]
        curve = run["curve"]  # (step, training seconds, held-out greedy accuracy): steps 0, 1, 2
        assert [c[0] for c in curve] == [0, 1, 2] and curve[0][1] == 0.0 and _positive(curve[-1][1])
        assert all(0.0 <= c[2] <= 1.0 for c in curve) and len(run["step_s"]) == 2
        assert peer[side]["final_accuracy"] == curve[-1][2]
    assert set(peer["targets"]) == {"0.85", "0.9"} and peer["trl_version"] and peer["held_out"] == 4
    assert set(peer["r1mega"]["phase_share"]) >= {"generate", "update"}
    assert set(peer["r1mega_async"]["phase_share"]) >= {"wait", "update"}

    asy = results["suites"]["async"]
    for side in ("sync", "async"):
        (run,) = asy[side]["runs"]
        assert _positive(run["samples_per_s"]) and 0.0 <= run["final_accuracy"] <= 1.0
        assert asy[side]["samples_per_s"] == run["samples_per_s"]
    assert 0.0 <= asy["async"]["trainer_wait_share"] <= 1.0 and 0.0 <= asy["async"]["rollout_idle_share"] <= 1.0
    assert set(asy["sync"]["runs"][0]["phase_share"]) >= {"generate", "update"}
    assert "wait" in asy["async"]["runs"][0]["phase_share"] and "generate" not in asy["async"]["runs"][0]["phase_share"]
    assert asy["speedup"] == asy["async"]["samples_per_s"] / asy["sync"]["samples_per_s"]

    md = (out / "results.md").read_text()
    for title in ("End-to-end GRPO step", "Training", "Rollout", "RL update: packed against padded",
                  "Time to accuracy against TRL", "Synchronous against asynchronous RL"):
        assert f"## {title}" in md
    for name in ("step", "train", "rollout", "packing", "peer", "async"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli.bench", "bench.suites=[nope]"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("r1mega: error: bench.suites='nope'")
