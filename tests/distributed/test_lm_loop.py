"""The LM loop: metrics.jsonl per step, periodic checkpoints, `load=auto` resumes exactly, the loss falls."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from r1mega.config.schema import (ModelConfig, OptimizerConfig, ParallelConfig, R1Config, TrainerConfig,
                                  PretrainConfig)
from r1mega.platform.launch import spawn

pytestmark = pytest.mark.distributed

STEPS = 30


def _config(output_dir: str, steps: int = STEPS, **trainer) -> R1Config:
    model = ModelConfig(name="tiny", arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, vocab_size=128, qk_layernorm=True,
                        tie_word_embeddings=True)
    return R1Config(
        model=model,
        parallel=ParallelConfig(),
        # decay_steps fixed: the 4-step first leg keeps the 30-step schedule (pretrain.steps sets the default)
        pretrain=PretrainConfig(corpus="synthetic", steps=steps, seq_length=32, micro_batch_size=4,
                            global_batch_size=8, seed=5,
                            optimizer=OptimizerConfig(lr=3e-3, warmup_steps=3, decay_style="cosine",
                                                      decay_steps=STEPS, adam_beta2=0.98)),
        trainer=TrainerConfig(output_dir=output_dir, seed=3, **{"save_at_end": False, **trainer}),
    )


def _runs(root: str):
    from r1mega.checkpoint.state import TrainingCheckpointError
    from r1mega.platform.distributed import destroy, initialize, seed_everything
    from r1mega.platform.signals import STOP, Stopped
    from r1mega.trainer.pretrain import train

    runtime = initialize(ParallelConfig(), seed=3)
    out = {}
    try:
        for name, cfg in [("whole", _config(f"{root}/whole")),
                          ("first", _config(f"{root}/split", steps=4, save_every=2)),
                          ("rest", _config(f"{root}/split", load="auto"))]:
            seed_everything(cfg.trainer.seed)  # as the CLI does once per run
            out[name] = train(cfg, runtime)
        try:
            train(_config(f"{root}/bad", load=f"{root}/nowhere"), runtime)
        except TrainingCheckpointError as e:
            out["error"] = str(e)
        STOP._handle(signal.SIGUSR1, None)  # as when Slurm's time-limit warning arrives
        try:
            train(_config(f"{root}/stopped"), runtime)
        except Stopped as e:
            out["stopped"] = str(e)
    finally:
        destroy()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return root, spawn(1, _runs, str(root))[0]


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_and_checkpoints(runs):
    root, out = runs
    lines = _lines(root / "split" / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert set(lines[0]) >= {"step", "loss", "grad_norm", "lr", "tokens_per_s"}
    ckpts = root / "split" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2", "step_4"]
    assert (ckpts / "latest").read_text().strip() == "step_4"
    assert not (root / "whole" / "checkpoints").exists()  # save_every=0 and save_at_end=false


def test_auto_resume_continues_the_same_run(runs):
    _, out = runs
    assert [m["step"] for m in out["rest"]] == list(range(5, STEPS + 1))
    for got, want in zip(out["first"] + out["rest"], out["whole"]):
        assert got["lr"] == want["lr"]
        assert abs(got["loss"] - want["loss"]) / want["loss"] < 1e-6, (got, want)


def test_loss_falls(runs):
    _, out = runs
    losses = [m["loss"] for m in out["whole"]]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_explicit_missing_checkpoint_is_one_line(runs):
    root, out = runs
    assert str(root / "nowhere") in out["error"] and "\n" not in out["error"]


def test_stop_signal_ends_pretraining_after_the_step(runs):
    _, out = runs
    assert out["stopped"] == "stop signal: pre-training stopped at step 1 of 30"
