"""The R1 pipeline: stages run one after another, each reading earlier stages' outputs.

Every stage is its own process (`python -m r1mega.cli.<entry> overrides...`, or under
pipeline.launcher, e.g. torchrun), with trainer.output_dir = <pipeline.output_dir>/<stage>.
`{name}` in a stage's overrides stands for stage `name`'s folder. A stage that finished
leaves stage.json and is not run again; one stopped midway resumes from its own latest
checkpoint (trainer.load=auto) when the pipeline is started again. Every stage's config is
composed and validated before the first one starts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from r1mega.config.errors import ConfigError, require
from r1mega.config.loader import load_config
from r1mega.config.schema import PipelineConfig, R1Config, StageConfig
from r1mega.config.stage_rules import check_sft_run
from r1mega.platform.signals import STOP_SIGNALS
from r1mega.recipe.jsonl import write_json
from r1mega.trainer.metrics import METRICS_FILE, read_rows
from r1mega.trainer.rl.teacher_check import check_teacher

log = logging.getLogger("r1mega.recipe")

ENTRY = {"cold_start_data": "r1mega.cli.cold_start", "eval": "r1mega.cli.evaluate", "sft": "r1mega.cli.sft",
         "rl": "r1mega.cli.train", "opd": "r1mega.cli.train", "sample": "r1mega.cli.sample"}
# what a stage of each kind leaves behind once it is complete (a stopped run leaves no such file)
PRODUCT = {"cold_start_data": "data_stats.json", "eval": "eval.json", "sft": "model/model.yaml",
           "rl": "model/model.yaml", "opd": "model/model.yaml", "sample": "stats.json"}
RESUMABLE = {"sft", "rl", "opd"}
MODEL_KINDS = {"sft", "rl", "opd"}  # stages that export a model (the ones `evaluate: true` applies to)
RUNS = {"rl", "opd"}  # RL runs: their metrics count the tokens generated (and the teacher's scored)
SINGLE_PROCESS = {"cold_start_data"}  # run with plain python whatever pipeline.launcher is
DONE, SUMMARY = "stage.json", "summary.json"
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z0-9_-]+)\}")  # not Hydra's ${...} interpolations


class StageFailed(RuntimeError):
    """A stage process failed or stopped before finishing."""


def stage_dirs(p: PipelineConfig) -> Dict[str, Path]:
    root = Path(p.output_dir).resolve()
    return {st.name: root / st.name for st in p.stages}


def expand(overrides: Sequence[str], dirs: Dict[str, Path], where: str,
           variables: Optional[Dict[str, str]] = None) -> List[str]:
    """Overrides with `{stage}` replaced by that stage's folder and `{var}` by pipeline.vars[var]."""
    table = {**{k: str(v) for k, v in (variables or {}).items()}, **{k: str(v) for k, v in dirs.items()}}

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in table:
            raise ConfigError(f"{where}: {{{name}}} names no stage (stages: {', '.join(dirs)}) and no "
                              f"pipeline.vars entry (vars: {', '.join(variables or {}) or 'none'})")
        return table[name]

    return [_PLACEHOLDER.sub(sub, o) for o in overrides]


def stage_overrides(p: PipelineConfig, st: StageConfig, dirs: Dict[str, Path], extra: Sequence[str]) -> List[str]:
    """The stage's full override list: common, its own, the command line's, then where it writes."""
    own = expand([*p.common, *st.overrides], dirs, f"pipeline stage {st.name!r}", dict(p.vars))
    if st.kind == "opd" and not any(o.startswith("algorithm=") for o in own):
        own = ["algorithm=opd", *own]  # on-policy distillation is r1mega-train with the opd preset
    out = [*own, *extra, f"trainer.output_dir={dirs[st.name]}"]
    return out + (["trainer.load=auto"] if st.kind in RESUMABLE else [])


def eval_overrides(stage_args: List[str], folder: Path) -> List[str]:
    """Held-out evaluation of a stage's exported model, in <stage>/eval."""
    keep = [o for o in stage_args if not o.startswith(("trainer.output_dir=", "trainer.load="))]
    return [*keep, f"model.mcore_path={folder / 'model'}", f"trainer.output_dir={folder / 'eval'}"]


def validate_stages(p: PipelineConfig, extra: Sequence[str]) -> None:
    """Compose and validate every stage's config (and its evaluation's) before anything runs."""
    dirs = stage_dirs(p)
    promised: Dict[Path, R1Config] = {}  # model folders of the stages before, with their configs
    for st in p.stages:
        args = stage_overrides(p, st, dirs, extra)
        try:
            require(not st.evaluate or st.kind in MODEL_KINDS,
                    f"evaluate: true needs a stage that exports a model ({', '.join(sorted(MODEL_KINDS))})")
            rules = {"sft": check_sft_run, "opd": partial(check_teacher, promised=dict(promised))}.get(st.kind)
            cfg = load_config(args, entry_rules=rules)
            require(st.kind != "opd" or cfg.algorithm.opd is not None,
                    "a stage of kind opd needs algorithm.opd (its overrides set another algorithm)")
            if st.kind in MODEL_KINDS:
                promised[dirs[st.name] / "model"] = cfg
            if st.evaluate:
                load_config(eval_overrides(args, dirs[st.name]))
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {st.name!r}: {e}") from None


def _die_with_parent() -> None:
    """In the stage process: receive SIGTERM (checkpoint and stop) if the runner dies first."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run(command: List[str], log_file: Path) -> int:
    """Run a stage process writing to its log file, and echo the file as it grows.

    The stage never writes into a pipe, so it outlives a dead runner long enough to save a
    checkpoint (it gets SIGTERM then). The stop signals sent to the runner are passed on;
    Ctrl-C reaches it through the terminal's process group."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as sink, log_file.open("rb") as tail:
        tail.seek(0, 2)
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        try:
            while proc.poll() is None:
                _echo(tail)
                time.sleep(0.2)
            _echo(tail)
            return proc.returncode
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if proc.poll() is None:  # the runner is failing: do not leave a trainer behind
                proc.terminate()
                proc.wait()


def _echo(tail) -> None:
    data = tail.read()
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _launch(p: PipelineConfig, kind: str, args: List[str], folder: Path, name: str) -> float:
    launcher = list(p.launcher) if p.launcher and kind not in SINGLE_PROCESS else [sys.executable, "-m"]
    command = [*launcher, ENTRY[kind], *args]
    _remove(kind, folder)  # left by an earlier attempt, it would pass for this one's
    start = time.perf_counter()
    code = _run(command, folder / "stage.log")
    seconds = time.perf_counter() - start
    if code != 0:
        raise StageFailed(f"stage {name!r} ({kind}) exited with code {code}; log: {folder / 'stage.log'}")
    if not (folder / PRODUCT[kind]).is_file():
        raise StageFailed(f"stage {name!r} stopped before finishing ({folder / PRODUCT[kind]} is missing); "
                          "run the pipeline again to resume it")
    return seconds


def _remove(kind: str, folder: Path) -> None:
    """A stale product of an earlier attempt: the exported model folder, or the product file."""
    if kind in MODEL_KINDS:
        shutil.rmtree(folder / "model", ignore_errors=True)
    else:
        (folder / PRODUCT[kind]).unlink(missing_ok=True)


def run_stage(p: PipelineConfig, st: StageConfig, dirs: Dict[str, Path], extra: Sequence[str]) -> Dict:
    """Run one stage (and its evaluation) unless already done; its stage.json record."""
    folder = dirs[st.name]
    done_file = folder / DONE
    args = stage_overrides(p, st, dirs, extra)
    record = json.loads(done_file.read_text()) if done_file.is_file() else None
    if record is None:
        log.info("== stage %s (%s) -> %s", st.name, st.kind, folder)
        record = {"name": st.name, "kind": st.kind, "seconds": _launch(p, st.kind, args, folder, st.name),
                  "overrides": args}
        write_json(done_file, record)
    else:
        log.info("== stage %s (%s): done, skipped", st.name, st.kind)
    if st.evaluate and "eval_seconds" not in record:
        record["eval_seconds"] = _launch(p, "eval", eval_overrides(args, folder), folder / "eval", st.name)
        write_json(done_file, record)
    return record


def _eval_of(st: StageConfig, folder: Path) -> Optional[dict]:
    file = folder / "eval.json" if st.kind == "eval" else folder / "eval" / "eval.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _tokens(st: StageConfig, folder: Path, record: dict, samples: Dict[Path, Optional[float]]) -> Dict:
    """Tokens the stage's model generated (a sampling stage's every sample; an RL run's rollouts) and the teacher
    tokens it cost: in on-policy distillation those the teacher scored; in SFT on a sampling stage's data, the
    tokens that stage generated (every sample, kept or not). The cost of distilling either way."""
    generated = teacher = None
    if st.kind == "sample" and (folder / PRODUCT["sample"]).is_file():
        generated = json.loads((folder / PRODUCT["sample"]).read_text())["all"].get("response_tokens")
    elif st.kind == "sft":
        files = next((o.split("=", 1)[1] for o in reversed(record.get("overrides", []))
                      if o.startswith("sft.train_files=")), "")
        spent = [n for data, n in samples.items() if str(data) in files and n is not None]
        teacher = sum(spent) if spent else None
    elif st.kind in RUNS and (folder / METRICS_FILE).is_file():
        latest = {r["step"]: r for r in read_rows(folder / METRICS_FILE) if "response/tokens" in r}  # resumed: last
        generated = sum(r["response/tokens"] for r in latest.values())
        if st.kind == "opd":
            teacher = sum(r.get("opd/teacher_tokens", 0.0) for r in latest.values())
    return {"generated_tokens": generated, "teacher_tokens": teacher}


def summary(p: PipelineConfig) -> List[Dict]:
    """Rows of the results table: every stage with its held-out accuracy (where evaluated) and wall time."""
    dirs = stage_dirs(p)
    rows, samples = [], {}  # a sampling stage's data file -> the tokens it generated
    for st in p.stages:
        done = dirs[st.name] / DONE
        if not done.is_file():
            continue
        record = json.loads(done.read_text())
        metrics = _eval_of(st, dirs[st.name]) or {}
        tokens = _tokens(st, dirs[st.name], record, samples)
        if st.kind == "sample":
            samples[dirs[st.name] / "data.jsonl"] = tokens["generated_tokens"]
        rows.append({"stage": st.name, "kind": st.kind, "seconds": record["seconds"], **tokens,
                     "eval_seconds": record.get("eval_seconds", 0.0),
                     "greedy_accuracy": metrics.get("eval/greedy_accuracy"),
                     "mean_at_k": metrics.get("eval/mean_at_k"), "pass_at_k": metrics.get("eval/pass_at_k"),
                     "k": metrics.get("eval/k")})
    return rows


def format_table(rows: List[Dict]) -> str:
    """A Markdown table of summary() rows."""
    def pct(v):
        return "" if v is None else f"{100 * v:.1f}%"

    def clock(s):
        return f"{int(s // 60)}m{int(s % 60):02d}s"

    def count(n):
        return "" if n is None else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"

    lines = ["| stage | kind | greedy pass@1 | sampled pass@1 | pass@k | tokens generated | teacher tokens "
             "| wall time (stage + eval) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = f" (k={int(r['k'])})" if r["k"] else ""
        wall = clock(r["seconds"]) + (f" + {clock(r['eval_seconds'])}" if r["eval_seconds"] else "")
        lines.append(f"| {r['stage']} | {r['kind']} | {pct(r['greedy_accuracy'])} | {pct(r['mean_at_k'])} "
                     f"| {pct(r['pass_at_k'])}{k} | {count(r.get('generated_tokens'))} "
                     f"| {count(r.get('teacher_tokens'))} | {wall} |")
    return "\n".join(lines)


def run_pipeline(p: PipelineConfig, extra: Sequence[str] = ()) -> List[Dict]:
    """Validate every stage, run those not done yet, write and return the summary."""
    if not p.stages:
        raise ConfigError("pipeline.stages is empty: pick an experiment, e.g. experiment=r1_tiny")
    validate_stages(p, extra)
    dirs = stage_dirs(p)
    for st in p.stages:
        run_stage(p, st, dirs, extra)
    rows = summary(p)
    write_json(Path(p.output_dir) / SUMMARY, rows)
    (Path(p.output_dir) / "summary.md").write_text(format_table(rows) + "\n")
    return rows
