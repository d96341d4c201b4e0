"""Run metrics: one JSON line per step, TensorBoard scalars, a progress bar, a PNG at the end.

Only the logging rank (global rank 0) creates a MetricsLog; other ranks pass None around.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from r1mega.platform.atomic import write_text_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RL_BAR = {"reward": "reward/mean", "acc": "reward/accuracy", "len": "response/length_mean"}
PLOT_FILE = "curves.png"
# (panel title, metric keys) of the PNG; a key missing from every row is left out
PANELS = (
    ("reward", ("reward/mean", "eval/reward")),
    ("accuracy", ("reward/accuracy", "eval/greedy_accuracy", "eval/pass_at_k")),
    ("response length", ("response/length_mean", "response/length_max")),
)


class MetricsLog:
    def __init__(self, folder: str | Path, total_steps: int, tensorboard: bool, progress: bool, start_step: int = 0,
                 desc: str = "rl", bar_keys: Mapping[str, str] = RL_BAR):
        """start_step: the step the run continues from (its checkpoint's; 0 for a fresh start).
        bar_keys: progress-bar label -> metric key; a row with none of them is logged instead."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = self.folder / METRICS_FILE
        keep_through(self.file, start_step)
        self.writer = None
        if tensorboard:  # the purge step hides the events the run will write again
            self.writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=_first_new(start_step))
        self.bar_keys = dict(bar_keys)
        self.bar = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Dict[str, float], console: bool = True) -> None:
        """Append a row (a crash loses at most this one), mirror it to TensorBoard, update the bar."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.bar is not None and any(key in metrics for key in self.bar_keys.values()):
            self.bar.n = step
            self.bar.set_postfix({label: _fmt(metrics.get(key, float("nan")))
                                  for label, key in self.bar_keys.items()}, refresh=True)
        elif console:
            log.info("step %d  %s", step, "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _first_new(start_step: int) -> int:
    """The first step a run continuing from `start_step` writes: the next one, or step 0 (the
    evaluation before training) for a fresh start."""
    return start_step + 1 if start_step > 0 else 0


def keep_through(file: str | Path, start_step: int) -> None:
    """Drop the rows a run continuing from `start_step` writes again: those a killed run wrote after
    its last checkpoint (all of them for a fresh start), so every step appears once. Rewritten
    whole, through a temporary file and a rename: a crash leaves the old file or the new one."""
    file = Path(file)
    if not file.is_file():
        return
    text = file.read_text()
    rows = _parse_rows(text)
    kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] < _first_new(start_step)]
    torn = bool(text) and not text.endswith("\n")  # a killed run's half-written last row
    if len(kept) != len(rows) or torn:
        write_text_atomic(file, "".join(json.dumps(r) + "\n" for r in kept))


def read_rows(file: str | Path) -> List[dict]:
    """The rows of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    return _parse_rows(Path(file).read_text())


def _parse_rows(text: str) -> List[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(file: str | Path, out: Optional[str | Path] = None) -> Path:
    """PNG of reward, accuracy and response-length curves from a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(file)
    out = Path(out) if out else Path(file).with_name(PLOT_FILE)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plain(v):
    return float(v) if hasattr(v, "item") else v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
