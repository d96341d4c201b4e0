"""Distillation: a Qwen3-style teacher under TP=2 writes traces through the rejection sampler; a
smaller Llama-style student with another tokenizer, on one rank, learns them by SFT on the
re-tokenised text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_helpers import config

pytestmark = pytest.mark.distributed

TEACHER = ["parallel.tp=2", "sample.max_prompts=8", "sample.samples_per_prompt=3", "sample.prompts_per_call=4", "sample.keep_per_prompt=2",
           # an untrained teacher is never right: accept every finished or cut-off response here
           "sample.min_accuracy=0", "sample.min_format=0", "sample.min_language=0",
           "rollout.max_new_tokens=12"]
STUDENT = ["model.arch=llama", "model.qk_layernorm=false", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
           "model.num_query_groups=1", "model.vocab_size=320", "sft.template=r1_zero", "sft.steps=4",
           "sft.samples_per_step=8", "sft.micro_batch_tokens=256", "optimizer.lr=3e-3", "optimizer.warmup_steps=0"]


def _teacher(out: str, extra=()):
    from r1mega.recipe.rejection import run
    from r1mega.platform.distributed import destroy, initialize

    cfg = config(out, [*TEACHER, *extra], world_size=2)
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        return run(cfg, runtime)
    finally:
        destroy()


def _student(out: str, data: str):
    from r1mega.platform.distributed import destroy, initialize
    from r1mega.trainer.model_setup import run_tokenizer
    from r1mega.trainer.sft import train

    cfg = config(out, [*STUDENT, f"sft.train_files=[{data}]"])
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        return train(cfg, runtime), len(run_tokenizer(cfg))
    finally:
        destroy()


def test_teacher_traces_train_a_smaller_student_with_another_tokenizer(tmp_path):
    from r1mega.platform.launch import spawn

    stats = spawn(2, _teacher, str(tmp_path / "teacher"))[0]
    rows = [json.loads(line) for line in (tmp_path / "teacher" / "data.jsonl").read_text().splitlines()]
    assert stats["all"]["prompts"] == 8 and stats["all"]["samples"] == 24
    assert len(rows) == stats["all"]["kept"] > 0
    assert stats["all"]["kept"] + sum(stats["all"]["rejected"].values()) == 24
    for row in rows:
        p = row["provenance"]
        assert p["source_checkpoint"] == "random initialisation" and p["prompt_id"] in row["id"]
        assert set(p["rewards"]) >= {"accuracy", "format", "language"} and p["response_tokens"] >= 1
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]

    # a stopped sampler resumes from the calls it finished; a lost call is generated again, identically
    data = (tmp_path / "teacher" / "data.jsonl").read_text()
    parts = sorted((tmp_path / "teacher" / "parts").glob("*.json"))
    assert len(parts) == 2  # 8 prompts in calls of 4
    parts[0].unlink()
    (tmp_path / "teacher" / "data.jsonl").unlink()
    spawn(2, _teacher, str(tmp_path / "teacher"))
    assert (tmp_path / "teacher" / "data.jsonl").read_text() == data
    # parts saved under another setup (here: sampling temperature) are not reused
    spawn(2, _teacher, str(tmp_path / "teacher"), ["rollout.temperature=0.5"])
    assert (tmp_path / "teacher" / "data.jsonl").read_text() != data

    # two data-parallel ranks: each filters its own prompts' responses; the shards join
    dp_stats = spawn(2, _teacher, str(tmp_path / "teacher_dp"), ["parallel.tp=1"])[0]
    dp_rows = [json.loads(line) for line in (tmp_path / "teacher_dp" / "data.jsonl").read_text().splitlines()]
    assert dp_stats["all"]["prompts"] == 8 and dp_stats["all"]["samples"] == 24
    assert len(dp_rows) == dp_stats["all"]["kept"] and len({r["id"] for r in dp_rows}) == len(dp_rows)
    assert len({r["provenance"]["prompt_id"] for r in dp_rows}) == dp_stats["all"]["prompts_kept"]

    history, vocab = spawn(1, _student, str(tmp_path / "student"), str(tmp_path / "teacher" / "data.jsonl"))[0]
    assert vocab <= 320 and vocab != 384  # the student reads the text with its own tokenizer
    assert len(history) == 4 and all(h["tokens"] > 0 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    exported = (tmp_path / "student" / "model" / "model.yaml").read_text()
    assert "hidden_size: 32" in exported and "num_layers: 1" in exported and "arch: llama" in exported
    assert (Path(tmp_path / "student" / "model") / "tokenizer.json").is_file()
