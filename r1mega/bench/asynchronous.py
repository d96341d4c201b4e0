"""Synchronous against asynchronous RL on the same work and the same cores.

Both sides train the run's pre-trained base model (the race's HF export, r1mega/bench/peer.py) on
the same prompt files, for the same steps, so they see the same number of samples. The synchronous
side runs `ranks` data-parallel ranks, each generating and training its share; the asynchronous
side runs ranks - workers trainer ranks beside `workers` rollout workers (r1mega/rollout/worker.py)
with the configured staleness bound. Cores are shared out among each side's processes as a run
shares them. Sides alternate, `runs` times, seeds trainer.seed + 0, 1, ...

Per side: samples/s over steps 2 on (the first step starts the workers and cannot overlap), held-out
greedy accuracy at the end (after the same samples), and where each side's time went: the
synchronous ranks' phases; the asynchronous trainer's wait for groups and the workers' busy share.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

from r1mega.bench.measure import median
from r1mega.bench.peer import PHASES, export_base_model, race_config, train_r1mega, write_prompts
from r1mega.config.schema import R1Config
from r1mega.config.validate import validate
from r1mega.platform.launch import spawn
from r1mega.trainer.metrics import METRICS_FILE, read_rows

SIDES = ("sync", "async")


def run(cfg: R1Config) -> Dict:
    with tempfile.TemporaryDirectory(prefix="r1mega-async-") as tmp:
        work = Path(tmp)
        base = spawn(1, export_base_model, cfg, str(work / "base"))[0]
        train, test = write_prompts(cfg, work)
        runs: Dict[str, List[Dict]] = {side: [] for side in SIDES}
        for i in range(cfg.bench.asynchronous.runs):
            seeded = replace(cfg, trainer=replace(cfg.trainer, seed=cfg.trainer.seed + i))
            for side in SIDES:
                runs[side].append(_run(side_config(seeded, side, work / "base", train, test, work / f"{side}-{i}")))
    return summarize(cfg, base, runs)


def side_config(cfg: R1Config, side: str, model_dir: Path, train: Path, test: Path, out: Path) -> R1Config:
    """The race's config of r1mega (peer.race_config), for this suite's steps, on one side's processes."""
    b = cfg.bench.asynchronous
    race = race_config(cfg, model_dir, train, test, out)
    race = replace(race, trainer=replace(race.trainer, steps=b.steps, eval_every=0),
                   parallel=replace(race.parallel, nproc=b.ranks if side == "sync" else b.ranks - b.workers))
    if side == "async":
        asynchronous = replace(race.rollout.asynchronous, workers=b.workers, partial=b.partial)
        race = replace(race, rollout=replace(race.rollout, mode="async", asynchronous=asynchronous),
                       algorithm=replace(race.algorithm, max_staleness=b.max_staleness))
    validate(race, race.parallel.nproc)
    return race


def _run(race: R1Config) -> Dict:
    spawn(race.parallel.nproc, train_r1mega, race)
    rows = read_rows(Path(race.trainer.output_dir) / METRICS_FILE)
    steps = [r for r in rows if r["step"] >= 2]  # the first step cannot overlap: left out of the rates
    seconds = sum(r["time/step"] for r in steps)
    samples = len(steps) * race.data.prompts_per_step * race.algorithm.group_size
    out = {"samples_per_s": samples / seconds, "seconds": seconds,
           "final_accuracy": [r for r in rows if "eval/greedy_accuracy" in r][-1]["eval/greedy_accuracy"],
           "reward_mean": sum(r["reward/mean"] for r in steps) / len(steps),
           "phase_share": {k: v / seconds for k in PHASES + ("wait",)
                           if (v := sum(r.get(f"time/{k}", 0.0) for r in steps)) > 0}}
    if race.rollout.mode == "async":
        out["trainer_wait_share"] = sum(r["async/trainer_wait_s"] for r in steps) / seconds
        out["rollout_idle_share"] = 1.0 - sum(r["async/rollout_busy_share"] for r in steps) / len(steps)
        out["staleness_mean"] = sum(r["async/staleness_mean"] for r in steps) / len(steps)
    return out


def summarize(cfg: R1Config, base: str, runs: Dict[str, List[Dict]]) -> Dict:
    b = cfg.bench.asynchronous
    sides = {}
    for side, rs in runs.items():
        keys = [k for k in rs[0] if k != "phase_share"]
        sides[side] = {**{k: median([r[k] for r in rs]) for k in keys}, "runs": rs}
    return {"model": cfg.model.name, "base_model": base, "algorithm": cfg.algorithm.name,
            "prompts_per_step": cfg.data.prompts_per_step, "group_size": cfg.algorithm.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens, "steps": b.steps, "ranks": b.ranks, "workers": b.workers,
            "max_staleness": b.max_staleness, "partial": b.partial, "runs": b.runs, "held_out": cfg.data.test_size,
            **sides, "speedup": sides["async"]["samples_per_s"] / sides["sync"]["samples_per_s"],
            "accuracy_gap": sides["async"]["final_accuracy"] - sides["sync"]["final_accuracy"]}
