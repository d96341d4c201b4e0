"""Time to accuracy against TRL's GRPOTrainer: how fast each reaches a held-out greedy accuracy.

Both sides start from one checkpoint: the run's base model (the built-in task's, pre-trained as
the default run builds it, cached) exported to HF format with its tokenizer, which TRL loads and
r1mega loads back through its HF reader. Both train on one prompt file (the built-in task's train
split, rendered in the run's template), with the run's group size, prompts per step, response
length, learning rate (constant: TRL's scheduler and megatron's warm-up differ), clipping, KL,
loss aggregation and rule-based rewards, and evaluate greedy on one held-out file before the first
step and every bench.peer.eval_every steps. Evaluation is left out of the training times on both
sides (each uses its own generation loop); each side runs in its own process, one after the other,
bench.peer.runs times with seeds trainer.seed + 0, 1, ... (r1mega, TRL, r1mega, TRL, ...): when a
run crosses a target depends on its draws, so medians over runs are what compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from r1mega.bench.measure import median
from r1mega.config.schema import ParallelConfig, R1Config
from r1mega.data.tasks import make_task
from r1mega.data.templates import render_prompt
from r1mega.platform.launch import spawn
from r1mega.trainer.metrics import METRICS_FILE, read_rows

TRL_ADV_EPS = 1e-4  # TRL divides advantages by (std + 1e-4); r1mega's side uses the same
PHASES = ("generate", "score", "wait", "advantages", "logprobs", "update", "sync", "release")


def run(cfg: R1Config) -> Dict:
    with tempfile.TemporaryDirectory(prefix="r1mega-peer-") as tmp:
        work = Path(tmp)
        base = spawn(1, export_base_model, cfg, str(work / "base"))[0]
        train, test = write_prompts(cfg, work)
        runs: Dict[str, List[Dict]] = {"r1mega": [], "r1mega_async": [], "trl": []}
        for i in range(cfg.bench.peer.runs):
            seeded = replace(cfg, trainer=replace(cfg.trainer, seed=cfg.trainer.seed + i))
            runs["r1mega"].append(_r1mega(seeded, work / "base", train, test, work / f"r1mega-{i}"))
            runs["r1mega_async"].append(_r1mega(seeded, work / "base", train, test, work / f"r1mega-async-{i}",
                                                asynchronous=True))
            runs["trl"].append(_trl(seeded, work / "base", train, test, work / f"trl-{i}"))
    return summarize(cfg, base, runs)


def export_base_model(cfg: R1Config, folder: str) -> str:
    """The run's cached base model (built first if missing) as an HF folder with its tokenizer."""
    from r1mega.checkpoint.hf_convert import save_hf
    from r1mega.checkpoint.mcore import load_model
    from r1mega.models.builder import build_model
    from r1mega.platform.distributed import running
    from r1mega.trainer.model_setup import run_tokenizer
    from r1mega.trainer.pretrain import ensure_base_model

    single = replace(cfg, parallel=ParallelConfig())
    with running(single.parallel, cfg.trainer.seed) as runtime:
        tokenizer = run_tokenizer(single)
        base = ensure_base_model(single, runtime, tokenizer)
        chunks = build_model(cfg.model, single.parallel)
        load_model(chunks, str(base))
        save_hf(chunks, cfg.model, folder, tokenizer=tokenizer)
    return str(base)


def write_prompts(cfg: R1Config, work: Path) -> Tuple[Path, Path]:
    """The train and held-out splits of the run's task, rendered: what both sides read."""
    d = cfg.data
    paths = []
    for split, size in (("train", d.train_size), ("test", d.test_size)):
        records = make_task(d.name, split, size, d.seed, **dict(d.difficulty))
        rows = [{"prompt": render_prompt(r, None, d.template), "answer": r.answer, "data_source": r.data_source}
                for r in records]
        path = work / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def _threads() -> int:
    # the count r1mega's initialize() gives a single rank, for both sides
    return os.cpu_count() or 1


def race_config(cfg: R1Config, model_dir: Path, train: Path, test: Path, out: Path) -> R1Config:
    """The run's config as r1mega's side of the race trains it."""
    p = cfg.bench.peer
    return replace(
        cfg,
        model=replace(cfg.model, hf_path=str(model_dir), mcore_path=None),
        data=replace(cfg.data, name="files", train_path=str(train), test_path=str(test), template="plain"),
        algorithm=replace(cfg.algorithm, adv_eps=TRL_ADV_EPS),
        optimizer=replace(cfg.optimizer, warmup_steps=0, decay_style="constant"),
        rollout=replace(cfg.rollout, temperature=1.0, top_p=1.0, top_k=-1, stop=[], eval_samples=0,
                        eval_temperature=0.0),
        trainer=replace(cfg.trainer, steps=p.steps, eval_every=p.eval_every, eval_at_ends=True, output_dir=str(out),
                        save_every=0, save_at_end=False, load=None, tensorboard=False, plot=False, progress=False),
        reward=replace(cfg.reward, num_workers=0),
    )


def train_r1mega(cfg: R1Config) -> None:
    """r1mega's side on one rank (spawned: a process of its own, as TRL's)."""
    from r1mega.platform.distributed import running
    from r1mega.trainer.rl.train import train

    Path(cfg.trainer.output_dir).mkdir(parents=True, exist_ok=True)
    with running(cfg.parallel, cfg.trainer.seed) as runtime:
        train(cfg, runtime)


def _r1mega(cfg: R1Config, model_dir: Path, train: Path, test: Path, out: Path, asynchronous: bool = False) -> Dict:
    """r1mega's side; asynchronous: the same on one trainer rank beside one rollout worker (sharing the
    cores), with bench.asynchronous.max_staleness and, unless the run sets one, the decoupled correction
    (the asynchronous suite measured 13 points of accuracy lost at staleness 1 without a correction)."""
    from r1mega.config.loader import compose_config, to_config
    from r1mega.config.validate import validate

    race = race_config(cfg, model_dir, train, test, out)
    if asynchronous:
        c = race.algorithm.correction
        if c.weight is None and c.reject is None:
            c = to_config(compose_config(["correction=decoupled"])).algorithm.correction
        race = replace(race, rollout=replace(race.rollout, mode="async"),
                       algorithm=replace(race.algorithm, max_staleness=cfg.bench.asynchronous.max_staleness,
                                         correction=c))
    validate(race, 1)
    spawn(1, train_r1mega, race)
    rows = read_rows(out / METRICS_FILE)
    steps = [r for r in rows if r["step"] >= 1]
    elapsed, curve = 0.0, []
    for r in rows:
        elapsed += r.get("time/step", 0.0)
        if "eval/greedy_accuracy" in r:
            curve.append([r["step"], elapsed, r["eval/greedy_accuracy"]])
    phases = {k: sum(s.get(f"time/{k}", 0.0) for s in steps) for k in PHASES}
    return {"step_s": [s["time/step"] for s in steps], "curve": curve,
            "phase_share": {k: v / max(elapsed, 1e-9) for k, v in phases.items() if v > 0}}


def _trl(cfg: R1Config, model_dir: Path, train: Path, test: Path, out: Path) -> Dict:
    a, o, p = cfg.algorithm, cfg.optimizer, cfg.bench.peer
    out.mkdir(parents=True)
    spec = {
        "model": str(model_dir), "prompts": str(train), "test_prompts": str(test), "work_dir": str(out),
        "result": str(out / "result.json"), "threads": _threads(), "seed": cfg.trainer.seed,
        "prompts_per_step": cfg.data.prompts_per_step, "group_size": a.group_size,
        "max_new_tokens": cfg.rollout.max_new_tokens, "steps": p.steps, "eval_every": p.eval_every, "lr": o.lr,
        "kl_beta": a.kl_beta, "eps_low": a.eps_low, "eps_high": a.eps_high, "loss_agg": a.loss_agg,
        "std_scaled": a.advantage == "grpo", "clip_grad": o.clip_grad, "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps, "weight_decay": o.weight_decay,
        "rewards": dict(cfg.reward.components), "reward_timeout_s": cfg.reward.timeout_s,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(_threads()), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "r1mega.bench.trl_peer", str(out / "spec.json")], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL's run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def reached(curve: List[List[float]], target: float) -> Optional[Dict[str, float]]:
    """The first evaluation at or above `target`: its step and training seconds (None: never)."""
    for step, seconds, accuracy in curve:
        if accuracy >= target:
            return {"step": step, "seconds": seconds}
    return None


def _median_time(hits: List[Optional[Dict[str, float]]]) -> Optional[Dict[str, float]]:
    """Median seconds and steps to a target over runs, a run that never got there counting as
    slowest; None when the median run did not get there."""
    inf = float("inf")
    seconds = median([h["seconds"] if h else inf for h in hits])
    steps = median([h["step"] if h else inf for h in hits])
    if seconds == inf:
        return None
    return {"seconds": seconds, "step": steps, "reached": sum(h is not None for h in hits)}


def _side(runs: List[Dict]) -> Dict:
    phases: Dict[str, float] = {}
    for r in runs:
        for k, v in r.get("phase_share", {}).items():  # r1mega's runs report their phases
            phases[k] = phases.get(k, 0.0) + v / len(runs)
    return {"runs": runs, "step_s_median": median([s for r in runs for s in r["step_s"]]),
            "final_accuracy": median([r["curve"][-1][2] for r in runs]),
            "train_s": median([r["curve"][-1][1] for r in runs]), **({"phase_share": phases} if phases else {})}


def summarize(cfg: R1Config, base: str, runs: Dict[str, List[Dict]]) -> Dict:
    import trl as trl_package

    p = cfg.bench.peer
    targets = {}
    for target in p.targets:
        hits = {name: [reached(r["curve"], target) for r in side] for name, side in runs.items()}
        got = {name: _median_time(h) for name, h in hits.items()}
        ratio = lambda a, b: got[a]["seconds"] / got[b]["seconds"] if got[a] and got[b] else None  # noqa: E731
        targets[f"{target:g}"] = {**got, "per_run": hits, "time_ratio_trl_over_r1mega": ratio("trl", "r1mega"),
                                  "time_ratio_sync_over_async": ratio("r1mega", "r1mega_async")}
    return {"model": cfg.model.name, "base_model": base, "algorithm": cfg.algorithm.name,
            "prompts_per_step": cfg.data.prompts_per_step, "group_size": cfg.algorithm.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens, "lr": cfg.optimizer.lr, "steps": p.steps,
            "eval_every": p.eval_every, "held_out": cfg.data.test_size, "runs": p.runs, "threads": _threads(),
            "trl_version": trl_package.__version__, **{side: _side(r) for side, r in runs.items()},
            "targets": targets}
