"""SFT-distilled against on-policy-distilled students on the miniature R1 (CPU): held-out greedy accuracy
against training wall time and against teacher tokens, and when each reaches 90% of the teacher's
greedy accuracy.

Reads a finished `r1mega-pipeline experiment=r1_tiny` folder: its final model (`rl2`, the teacher, with
its held-out accuracy) and the traces that model wrote (`distill_data`). Then, one after the other on
the same cores, from the same student base model (`model=tiny_small`, the teacher's tokenizer):

- SFT on the traces for several budgets of optimizer steps, each a run of its own (what a user with that
  budget would run), each evaluated afterwards;
- on-policy distillation (`algorithm=opd`, the teacher scoring every sampled token), evaluated every
  EVAL_EVERY steps of one run.

Training time is the sum of the runs' step times (metrics' `time/step`: start-up and evaluation left
out on both sides). SFT is charged the teacher's share of the sampling stage that wrote the traces it
used, in time and in generated tokens, in proportion to the prompts whose traces it read; on-policy
distillation is charged the tokens the teacher scored, whose time is inside its steps. Greedy pass@1 on
the pipeline's 200 held-out problems, as the pipeline's own evaluations.

Usage: python benchmarks/distill/compare.py [pipeline folder, default outputs/r1-tiny]
Writes benchmarks/results/distill/compare.json and compare.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "distill"
STUDENT = ["model=tiny_small", "trainer.progress=false", "trainer.plot=false", "trainer.tensorboard=false",
           "rollout.eval_samples=0"]
SFT = ["sft.template=r1_zero", "sft.samples_per_step=32", "optimizer.lr=3e-4"]  # as the pipeline's small_sft
SFT_STEPS = [8, 16, 32, 64]  # and the pipeline's own budget: two epochs over the traces
OPD = ["algorithm=opd", "optimizer.lr=3e-4"]  # as the pipeline's small_opd: 16 prompts x 8 samples a step
VARIANTS = {"opd": [], "opd_2_per_prompt": ["algorithm.group_size=2"], "opd_top8": ["algorithm.opd.top_k=8"]}
NAMES = {"sft": "SFT", "opd": "OPD, 16 x 8 samples", "opd_2_per_prompt": "OPD, 16 x 2 samples",
         "opd_top8": "OPD top-8, 16 x 8 samples"}
OPD_STEPS, EVAL_EVERY = 60, 5


def _run(entry: str, args: List[str], log: Path, product: Path) -> None:
    """The entry point's run, unless an earlier one left its product (a stopped comparison goes on)."""
    if product.is_file():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        done = subprocess.run([sys.executable, "-m", f"r1mega.cli.{entry}", *args], cwd=ROOT, stdout=sink,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{entry} failed ({done.returncode}); log: {log}")


def _rows(folder: Path) -> List[dict]:
    latest: Dict[int, dict] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest.setdefault(row["step"], {}).update(row)
    return [latest[s] for s in sorted(latest)]


def sft_curve(pipe: Path, work: Path) -> List[dict]:
    stats = json.loads((pipe / "distill_data" / "stats.json").read_text())["all"]
    sampling_s = json.loads((pipe / "distill_data" / "stage.json").read_text())["seconds"]
    kept = stats["kept"]
    points = [{"steps": 0, "seconds": 0.0, "teacher_tokens": 0.0,
               "greedy": json.loads((pipe / "small_base" / "eval.json").read_text())["eval/greedy_accuracy"]}]
    for steps in [*SFT_STEPS, math.ceil(2 * kept / 32)]:
        folder = work / f"sft-{steps}"
        _run("sft", [*STUDENT, *SFT, f"sft.train_files=[{pipe / 'distill_data' / 'data.jsonl'}]",
                     f"sft.steps={steps}", f"trainer.output_dir={folder}"], folder / "run.log",
             folder / "model" / "model.yaml")
        _run("evaluate", [*STUDENT, f"model.mcore_path={folder / 'model'}",
                          f"trainer.output_dir={folder / 'eval'}"], folder / "eval.log", folder / "eval" / "eval.json")
        share = min(1.0, 32 * steps / kept)  # of the prompts whose traces the run read
        train_s = sum(r.get("time/step", 0.0) for r in _rows(folder))
        points.append({"steps": steps, "train_seconds": train_s, "sampling_seconds": share * sampling_s,
                       "seconds": train_s + share * sampling_s, "teacher_tokens": share * stats["response_tokens"],
                       "greedy": json.loads((folder / "eval" / "eval.json").read_text())["eval/greedy_accuracy"]})
    return points


def opd_curve(pipe: Path, work: Path, name: str) -> List[dict]:
    folder = work / name
    _run("train", [*STUDENT, *OPD, *VARIANTS[name], f"algorithm.opd.teacher.path={pipe / 'rl2' / 'model'}",
                   f"trainer.steps={OPD_STEPS}", f"trainer.eval_every={EVAL_EVERY}", f"trainer.output_dir={folder}"],
         folder / "run.log", folder / "model" / "model.yaml")  # evaluated before the first step too
    points, seconds, tokens, generated = [], 0.0, 0.0, 0.0
    for r in _rows(folder):
        seconds += r.get("time/step", 0.0)
        tokens += r.get("opd/teacher_tokens", 0.0)
        generated += r.get("response/tokens", 0.0)
        if "eval/greedy_accuracy" in r:
            points.append({"steps": r["step"], "seconds": seconds, "teacher_tokens": tokens,
                           "student_tokens": generated, "greedy": r["eval/greedy_accuracy"]})
    return points


def at(points: List[dict], key: str, budget: float) -> float:
    """Greedy accuracy of the last point within the budget (the base model's when none is)."""
    return max((p for p in points if p[key] <= budget), key=lambda p: p[key])["greedy"]


def first_reaching(points: List[dict], target: float) -> dict | None:
    return next((p for p in points if p["greedy"] >= target), None)


def table(result: dict) -> str:
    sides, target = ["sft", *VARIANTS], result["target"]
    lines = [f"teacher greedy pass@1 {100 * result['teacher']:.1f}%; 90% of it: {100 * target:.1f}%", "",
             "| budget | " + " | ".join(NAMES[s] for s in sides) + " |", "|---|" + "---|" * len(sides)]
    for s in result["seconds_budgets"]:
        lines.append(f"| {s:.0f} s of training | " + " | ".join(
            f"{100 * at(result[side], 'seconds', s):.1f}%" for side in sides) + " |")
    for t in result["token_budgets"]:
        lines.append(f"| {t / 1e3:.0f}k teacher tokens | " + " | ".join(
            f"{100 * at(result[side], 'teacher_tokens', t):.1f}%" for side in sides) + " |")
    cells = []
    for side in sides:
        hit = first_reaching(result[side], target)
        cells.append(f"{hit['seconds']:.0f} s, {hit['teacher_tokens'] / 1e3:.0f}k tokens (step {hit['steps']})"
                     if hit else "not reached")
    lines.append(f"| first at {100 * target:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "| side | step | seconds | teacher tokens | greedy |", "|---|---|---|---|---|"]
    for side in sides:
        for p in result[side]:
            lines.append(f"| {NAMES[side]} | {p['steps']} | {p['seconds']:.0f} | {p['teacher_tokens'] / 1e3:.1f}k "
                         f"| {100 * p['greedy']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    pipe = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "outputs" / "r1-tiny").resolve()
    teacher = json.loads((pipe / "rl2" / "eval" / "eval.json").read_text())["eval/greedy_accuracy"]
    work = pipe / "distill-compare"
    start = time.perf_counter()
    result = {"teacher": teacher, "target": 0.9 * teacher, "sft": sft_curve(pipe, work)}
    for name in VARIANTS:
        result[name] = opd_curve(pipe, work, name)
    curves = [result[side] for side in ("sft", *VARIANTS)]
    longest = min(c[-1]["seconds"] for c in curves)
    most = min(c[-1]["teacher_tokens"] for c in curves)
    result.update({"seconds_budgets": [longest / 8, longest / 4, longest / 2, longest],
                   "token_budgets": [most / 8, most / 4, most / 2, most], "wall_seconds": time.perf_counter() - start})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(result, indent=2))
    (OUT / "compare.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
