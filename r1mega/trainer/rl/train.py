"""The RL run: set up, then the shared run loop over RL steps, with held-out evaluations; the curves
at the end."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

from r1mega.config.schema import R1Config
from r1mega.platform.distributed import Runtime
from r1mega.trainer.metrics import METRICS_FILE, PLOT_FILE, RL_BAR, plot_curves, read_rows
from r1mega.trainer.rl.context import RLContext
from r1mega.trainer.rl.evaluate import evaluate
from r1mega.trainer.rl.setup import setup
from r1mega.trainer.rl.step import rl_step
from r1mega.trainer.run import Job, export_model, final_model_dir, hf_model_dir, run

log = logging.getLogger(__name__)


def train(cfg: R1Config, runtime: Runtime) -> List[Dict[str, float]]:
    """Run GRPO for cfg.trainer.steps steps (counting those before a resume); return per-step metrics."""
    start = time.perf_counter()
    ctx = setup(cfg, runtime)
    try:
        history = run(cfg, runtime, job(ctx))
    finally:
        ctx.close()
    t = cfg.trainer
    metrics = Path(t.output_dir) / METRICS_FILE
    if runtime.is_main and t.plot and metrics.is_file():
        plot_curves(metrics)
    if runtime.is_main and metrics.is_file():
        print(summary(cfg, read_rows(metrics), time.perf_counter() - start), flush=True)
    return history


def summary(cfg: R1Config, rows: List[dict], seconds: float) -> str:
    """What a finished run shows last: held-out accuracy before and after, steps, wall time, where
    its curves and model are."""
    t = cfg.trainer
    last: Dict[int, dict] = {r["step"]: r for r in rows if "step" in r}  # a resumed run's repeats: the latest
    evals = [last[s] for s in sorted(last) if "eval/greedy_accuracy" in last[s]]
    steps = max(last, default=0)
    lines = [f"r1mega: {steps} steps of {cfg.algorithm.name} on {cfg.model.name} / {cfg.data.name} "
             f"in {_duration(seconds)}"]
    if evals:
        first, final = evals[0], evals[-1]
        title = f"held-out accuracy, {int(final['eval/prompts'])} prompts"
        lines.append(f"{title:<33}{'step ' + str(first['step']):>9}  {'step ' + str(final['step']):>9}")
        lines.append(_row("greedy pass@1", first, final, "eval/greedy_accuracy"))
        if "eval/mean_at_k" in final:
            k = int(final["eval/k"])
            lines.append(_row(f"sampled pass@1 (mean of {k})", first, final, "eval/mean_at_k"))
            lines.append(_row(f"pass@{k}", first, final, "eval/pass_at_k"))
    out = Path(t.output_dir)
    if (out / PLOT_FILE).is_file():
        lines.append(f"curves: {out / PLOT_FILE}")
    if final_model_dir(cfg).is_dir():
        lines.append(f"model:  {final_model_dir(cfg)}")
    if hf_model_dir(cfg).is_dir():
        lines.append(f"hf:     {hf_model_dir(cfg)}")
    return "\n".join(lines)


def _row(name: str, first: dict, final: dict, key: str) -> str:
    cell = lambda row: f"{100 * row[key]:8.1f}%" if key in row else f"{'-':>9}"  # noqa: E731
    return f"  {name:<31}{cell(first)}  {cell(final)}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def job(ctx: RLContext) -> Job:
    t = ctx.cfg.trainer

    def evaluate_due(step: int) -> Dict[str, float]:
        at_ends = t.eval_at_ends and step in (0, t.steps)
        between = t.eval_every and step % t.eval_every == 0 and 0 < step < t.steps
        return evaluate(ctx, seed=step) if at_ends or between else {}

    def data_state() -> dict:
        state = {"sampler": ctx.sampler.state_dict(), "engine": ctx.engine.state_dict()}
        if ctx.one_step_off is not None:  # collective
            state["one_step_off"] = ctx.one_step_off.state_dict()
            if state["one_step_off"]:  # the next step's prompts are drawn and sampled: the streams before them
                state["sampler"] = state["one_step_off"]["sampler"]
                state["engine"] = {**state["engine"], "calls": state["one_step_off"]["calls"]}
        if ctx.async_rollout is not None and ctx.async_rollout.controller:  # the rank a checkpoint keeps
            state["async"] = ctx.async_rollout.state_dict()
            state["sampler"] = state["async"]["sampler"]  # the prompt stream is the controller's
            # and so is the sampling-seed stream (request i samples as the synchronous engine's call i)
            state["engine"] = {**state["engine"], "calls": state["async"]["next_id"]}
        return state

    def load_data_state(state: dict) -> None:
        pending = (state.get("async") or {}).get("pending") or []
        if ctx.async_rollout is None and pending:
            # the prompt stream is past them: a synchronous run would never train on these prompts
            raise ValueError(f"written by rollout.mode=async with {len(pending)} request(s) of "
                             f"{sum(len(p[1]) for p in pending)} prompts queued and not yet trained on; "
                             "resume it with rollout.mode=async, which sends those first")
        ctx.sampler.load_state_dict(state["sampler"])
        ctx.engine.load_state_dict(state["engine"])
        if ctx.one_step_off is not None:  # the groups generated ahead, with their prompts drawn again
            ctx.one_step_off.load_state_dict(state.get("one_step_off") or {})
        if ctx.async_rollout is not None:  # from a synchronous run's checkpoint: its stream and seeds go on
            ctx.async_rollout.load_state_dict(state.get("async") or {
                "sampler": state["sampler"], "next_id": state["engine"].get("calls", 0), "pending": []})

    return Job("rl", t.steps, lambda step: rl_step(ctx, step), ctx.ddp_chunks, ctx.optimizer, ctx.scheduler,
               data_state=data_state,
               load_data_state=load_data_state, reference=ctx.ref_chunks, evaluate=evaluate_due,
               export=lambda: export_model(ctx.cfg, ctx.chunks, ctx.tokenizer), bar_keys=RL_BAR)
