"""Shared pieces of the RL tests: a small config, a reward a random model can earn, run helpers."""

from __future__ import annotations

from typing import List, Sequence

SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.head_dim=16", "model.init_method_std=0.1",
    "data.train_size=64", "data.test_size=6", "data.prompts_per_step=4", "data.difficulty.digits=2",
    "algorithm.group_size=4", "rollout.max_new_tokens=6", "rollout.eval_samples=2",
    "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.decay_style=constant",
    "pretrain.enabled=false", "reward.num_workers=0",
    "trainer.tensorboard=false", "trainer.plot=false", "trainer.progress=false", "trainer.log_every=1",
    "trainer.micro_batch_tokens=96",
    # random weights never answer right: reward the share of digits in the response instead
    "+reward.custom.digits._target_=rl_helpers.digit_share", "+reward.custom.digits.weight=1.0",
]


def digit_share(sample) -> float:
    """Share of digit characters in the response (a reward with signal for an untrained model)."""
    text = sample.response
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def config(output_dir: str, extra: Sequence[str] = (), world_size: int = 1, base: Sequence[str] = SMALL):
    from r1mega.config.loader import load_config

    return load_config([*base, f"trainer.output_dir={output_dir}", *extra], world_size=world_size)


def run(overrides: Sequence[str], output_dir: str, world_size: int, base: Sequence[str] = SMALL) -> List[dict]:
    """One RL run inside a spawned rank: per-step metrics (the same on every rank). `base`: the overrides
    before these, SMALL unless a test brings its own."""
    from r1mega.platform.distributed import destroy, initialize, seed_everything
    from r1mega.trainer.rl.train import train

    cfg = config(output_dir, overrides, world_size, base)
    runtime = initialize(cfg.parallel, cfg.trainer.seed)
    try:
        seed_everything(cfg.trainer.seed)
        return train(cfg, runtime)
    finally:
        destroy()


class KillAfter:
    """A reward (weight 0) that kills the process scoring it at its `after`-th sample, or with `hang`, stops
    it there (sleeps, silent): a rollout worker lost mid-run. It scores in that process when
    reward.num_workers=0. With `marker` (a path), only the first process to get there does it."""

    def __init__(self, after: int, marker: str = "", hang: bool = False):
        self.after, self.marker, self.hang, self.calls = after, marker, hang, 0

    def __call__(self, sample) -> float:
        import os
        import signal
        import time

        self.calls += 1
        if self.calls == self.after:
            if self.marker:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return 0.0
            if self.hang:
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return 0.0
