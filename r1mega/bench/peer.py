"""Peer comparison: r1mega and TRL's GRPOTrainer on the same work, interleaved in one run.

One random Qwen2 (a model preset, saved in HF format with the built-in tokenizer), one prompt
file of the built-in task in R1-Zero's template, and the same GRPO settings: group size,
prompts per step, response length, steps, learning rate, clipping, KL, loss aggregation,
rule-based rewards. Each side runs as its own process, alternating r1mega, TRL, r1mega, ...;
the first bench.warmup steps of every run are left out of the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from r1mega.bench.measure import median
from r1mega.checkpoint.hf_config import transformers_config
from r1mega.config.loader import compose_config, to_config
from r1mega.config.schema import ModelConfig, R1Config
from r1mega.data.tasks import make_task
from r1mega.data.templates import render_prompt
from r1mega.data.tokenizer import build_tiny_tokenizer, load_tokenizer

TRL_ADV_EPS = 1e-4  # TRL divides advantages by (std + 1e-4); r1mega's side uses the same


def run(cfg: R1Config) -> Dict:
    p = cfg.bench.peer
    with tempfile.TemporaryDirectory(prefix="r1mega-peer-") as tmp:
        work = Path(tmp)
        model = to_config(compose_config([f"model={p.model}"])).model
        model_dir = save_random_hf_model(model, work / "model", cfg.trainer.seed)
        prompts, prompt_tokens = write_prompts(cfg, work / "prompts.jsonl", model_dir)
        runs: Dict[str, List[Dict]] = {"r1mega": [], "trl": []}
        for i in range(p.rounds):
            runs["r1mega"].append(_r1mega(cfg, model_dir, prompts, prompt_tokens, work / f"r1mega-{i}"))
            runs["trl"].append(_trl(cfg, model_dir, prompts, work / f"trl-{i}"))
    return summarize(cfg, runs)


def save_random_hf_model(model: ModelConfig, folder: Path, seed: int) -> Path:
    """The preset as an HF checkpoint with random weights (transformers' own init) and r1mega's tokenizer."""
    from transformers import AutoModelForCausalLM


    tokenizer = load_tokenizer(build_tiny_tokenizer(folder, vocab_size=model.vocab_size))
    config = transformers_config(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def write_prompts(cfg: R1Config, path: Path, tokenizer_dir: Path) -> Tuple[Path, int]:
    """Exactly the prompts both sides train on (one pass of prompts_per_step x steps, rendered),
    and the longest one's length in tokens."""
    p = cfg.bench.peer
    d = cfg.data
    records = make_task(d.name, "train", p.prompts_per_step * p.steps, d.seed, **dict(d.difficulty))
    rows = [{"prompt": render_prompt(r, None, "r1_zero"), "answer": r.answer, "data_source": r.data_source}
            for r in records]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = load_tokenizer(tokenizer_dir)([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    return path, max(len(x) for x in ids)


def _threads() -> int:
    # the count r1mega's initialize() gives a single rank, for both sides
    return os.cpu_count() or 1


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(_threads()), "TOKENIZERS_PARALLELISM": "false"}


def _run(argv: List[str], what: str) -> None:
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _value(v) -> str:
    """A Hydra override value."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _shared_overrides(cfg: R1Config) -> List[str]:
    """The algorithm, optimizer and reward of this config, as overrides of r1mega-train."""
    a, p = cfg.algorithm, cfg.bench.peer
    out = [f"algorithm={a.name}"]
    out += [f"algorithm.{f.name}={_value(getattr(a, f.name))}" for f in fields(a)
            if f.name not in ("name", "group_size", "kl_beta", "adv_eps")]
    out += [f"algorithm.group_size={p.group_size}", f"algorithm.kl_beta={p.kl_beta}",
            f"algorithm.adv_eps={TRL_ADV_EPS}"]
    o = cfg.optimizer
    out += [f"optimizer.{k}={_value(getattr(o, k))}"
            for k in ("name", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "weight_decay")]
    out += [f"optimizer.lr={p.lr}", "optimizer.warmup_steps=0", "optimizer.decay_style=constant"]
    preset = to_config(compose_config([])).reward.components
    weights = {**{k: 0.0 for k in preset}, **cfg.reward.components}
    return out + [f"reward.components.{k}={w}" for k, w in weights.items()]


def _r1mega(cfg: R1Config, model_dir: Path, prompts: Path, prompt_tokens: int, out: Path) -> Dict:
    p = cfg.bench.peer
    overrides = [
        f"model={p.model}", f"model.hf_path={model_dir}", "data=files", f"data.train_path={prompts}",
        "data.template=plain", f"data.max_prompt_tokens={prompt_tokens}",
        f"data.prompts_per_step={p.prompts_per_step}", *_shared_overrides(cfg),
        f"rollout.max_new_tokens={p.max_new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "rollout.top_k=-1", "rollout.stop=[]", f"rollout.max_batch_size={p.prompts_per_step * p.group_size}",
        f"trainer.steps={p.steps}", f"trainer.output_dir={out}", f"trainer.seed={cfg.trainer.seed}",
        "trainer.eval_at_ends=false", "trainer.eval_every=0", "trainer.save_at_end=false",
        "trainer.tensorboard=false", "trainer.plot=false", "trainer.progress=false", "reward.num_workers=0",
        # one micro-batch per pass, as TRL's single per-device batch
        f"trainer.micro_batch_tokens={p.prompts_per_step * p.group_size * (prompt_tokens + p.max_new_tokens)}",
    ]
    _run([sys.executable, "-m", "r1mega.cli.train", *overrides], "r1mega's run")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [s["time/step"] for s in steps],
            "tokens": [s["perf/tokens_per_s"] * s["time/step"] for s in steps],
            "reward": [s["reward/mean"] for s in steps]}


def _trl(cfg: R1Config, model_dir: Path, prompts: Path, out: Path) -> Dict:
    p, a, o = cfg.bench.peer, cfg.algorithm, cfg.optimizer
    out.mkdir(parents=True)
    spec = {
        "model": str(model_dir), "prompts": str(prompts), "work_dir": str(out), "result": str(out / "result.json"),
        "threads": _threads(), "seed": cfg.trainer.seed, "prompts_per_step": p.prompts_per_step,
        "group_size": p.group_size, "max_new_tokens": p.max_new_tokens, "steps": p.steps, "lr": p.lr,
        "kl_beta": p.kl_beta, "eps_low": a.eps_low, "eps_high": a.eps_high, "loss_agg": a.loss_agg,
        "std_scaled": a.advantage == "grpo", "clip_grad": o.clip_grad, "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps, "weight_decay": o.weight_decay,
        "rewards": dict(cfg.reward.components),
        "reward_timeout_s": cfg.reward.timeout_s,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    _run([sys.executable, "-m", "r1mega.bench.trl_peer", str(out / "spec.json")], "TRL's run")
    return json.loads((out / "result.json").read_text())


def _side(runs: List[Dict], skip: int) -> Dict:
    """Medians over each run's timed steps, then over runs; rewards of the last step and the run."""
    step_s = median([median(r["step_s"][skip:]) for r in runs])
    tokens_per_s = median([median([t / s for t, s in zip(r["tokens"][skip:], r["step_s"][skip:])]) for r in runs])
    return {"step_s": step_s, "tokens_per_s": tokens_per_s,
            "final_reward": median([r["reward"][-1] for r in runs]),
            "mean_reward": median([sum(r["reward"]) / len(r["reward"]) for r in runs]),
            "runs": runs}


def summarize(cfg: R1Config, runs: Dict[str, List[Dict]]) -> Dict:
    p = cfg.bench.peer
    skip = cfg.bench.warmup  # check_peer: fewer than the steps
    r1, trl = _side(runs["r1mega"], skip), _side(runs["trl"], skip)
    import trl as trl_package

    return {"model": p.model, "algorithm": cfg.algorithm.name, "prompts_per_step": p.prompts_per_step,
            "group_size": p.group_size, "max_new_tokens": p.max_new_tokens, "steps": p.steps, "rounds": p.rounds,
            "timed_steps_per_run": p.steps - skip, "threads": _threads(), "trl_version": trl_package.__version__,
            "r1mega": r1, "trl": trl,
            "step_time_ratio_trl_over_r1mega": trl["step_s"] / r1["step_s"],
            "tokens_per_s_ratio_r1mega_over_trl": r1["tokens_per_s"] / trl["tokens_per_s"]}
