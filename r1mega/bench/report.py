"""Results of r1mega-bench: results.json, a Markdown table (results.md) and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

from r1mega.platform.atomic import write_text_atomic

JSON_FILE, MARKDOWN_FILE = "results.json", "results.md"


def write_results(results: Dict, out_dir: str | Path) -> List[Path]:
    """Write every file of a results dict; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / JSON_FILE, json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / MARKDOWN_FILE, markdown(results))
    for name in SECTIONS:  # a plot of an earlier run's suite would read as this run's
        if name not in results["suites"]:
            (out / f"{name}.png").unlink(missing_ok=True)
    return [out / JSON_FILE, out / MARKDOWN_FILE] + plots(results["suites"], out)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _table(header: List[str], rows: List[List]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _share(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{v:.1%}"


def _ratio(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{v:.2f}x"


def _memory(row: Dict) -> Optional[float]:
    return row.get("peak_gpu_mb", row.get("peak_rss_mb"))


def _step_md(s: Dict) -> str:
    phases = " / ".join(f"{k} {_f(v)}" for k, v in s["phase_s"].items())
    head = (f"{s['model']}, {s['algorithm']}, {s['ranks']} rank(s), {s['prompts_per_step']} prompts x "
            f"{s['group_size']}, up to {s['max_new_tokens']} new tokens; median of {s['timed_steps']} steps.\n\n")
    return head + _table(
        ["step s", "tokens/s", "samples/s", "forward GFLOP/token", "TFLOP/step", "MFU", "peak MB", "phases (s)"],
        [[s["step_s"], s["tokens_per_s"], s["samples_per_s"], s["model_gflops_per_token"], s["model_tflops_per_step"],
          s["mfu"], _memory(s), phases]])


def _train_md(t: Dict) -> str:
    head = (f"Sequence {t['seq_length']}, {t['micro_batch_size']} x {t['micro_batches']} micro-batches per "
            f"data-parallel rank, {t.get('dtype', 'fp32')}; forward, backward and optimizer step.\n\n")
    rows = [[r["model"], f"tp{r['tp']} pp{r['pp']} dp{r['dp']} ep{r['ep']}", r.get("tokens_per_s"),
             r.get("step_s"), r.get("model_tflops_per_s"), r.get("mfu"), _memory(r), r.get("skipped", "")]
            for r in t["rows"]]
    return head + _table(["model", "layout", "tokens/s", "step s", "model TFLOP/s", "MFU", "peak MB", "note"], rows)


def _rollout_md(r: Dict) -> str:
    head = (f"{r['model']}, {r['new_tokens']} new tokens per row. Prefill share: of the generate call's time; "
            f"prefill padding: of the positions the prefill computes. The native engine prefills in buckets of "
            f"similar prompt length (its default) and, timed alternately, in one left-padded forward.\n\n")
    rows = [[x["engine"], x.get("prompts"), x.get("batch_size"), x.get("prompt_tokens"), x.get("tokens_per_s"),
             x.get("seconds"), _share(x.get("prefill_share")), _share(x.get("prefill_padding_share")),
             x.get("unbucketed_tokens_per_s"), _share(x.get("unbucketed_prefill_share")),
             _share(x.get("unbucketed_prefill_padding_share")), _ratio(x.get("bucketed_prefill_speedup")), _memory(x),
             x.get("skipped") or x.get("note", "") or ("" if x.get("bucketed_prefill", True) else
                                                      "no length buckets here (one prefill both ways)")]
            for x in r["rows"]]
    partial = "".join(f"\nNative engine, {x['prompts']} prompts, batch {x['batch_size']}, a weight update halfway "
                      f"(partial rollouts): the KV cache kept {x['keep_s']:.3f} s, computed again "
                      f"{x['recompute_s']:.3f} s (**{x['recompute_cost']:.2f}x**).\n" for x in r.get("partial", []))
    return head + _table(["engine", "prompts", "batch", "prompt tokens", "generated tokens/s", "seconds",
                          "prefill share", "prefill padding", "one prefill: tokens/s", "prefill share",
                          "prefill padding", "buckets' speed-up", "peak MB", "note"], rows) + partial


def _peer_md(p: Dict) -> str:
    head = (f"{p['model']} from its pre-trained base checkpoint (HF export), {p['algorithm']}, "
            f"{p['prompts_per_step']} prompts x {p['group_size']}, {p['max_new_tokens']} new tokens, lr {p['lr']:g}, "
            f"{p['steps']} steps; greedy on {p['held_out']} held-out prompts every {p['eval_every']} steps; "
            f"training seconds exclude evaluation; medians of {p['runs']} run(s) per side (seeds differ). "
            f"TRL {p['trl_version']}.\n\n")

    def at(side: Dict, key: str) -> str:
        x = side.get(key)
        if x is None:
            return "not reached"
        return f"{x['seconds']:.0f} s (step {x['step']:g}; {x['reached']}/{p['runs']} runs)"

    rows = []
    for name, key in (("r1mega", "r1mega"), ("r1mega, async (1 trainer rank + 1 worker)", "r1mega_async"),
                      ("TRL GRPOTrainer", "trl")):
        s = p[key]
        rows.append([name, *[at(p["targets"][t], key) for t in p["targets"]], s["final_accuracy"], s["train_s"],
                     s["step_s_median"]])
    ratios = ", ".join(f"{float(t):.0%}: **{r:.2f}x**" for t, x in p["targets"].items()
                       if (r := x["time_ratio_trl_over_r1mega"]) is not None)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(p["r1mega"]["phase_share"].items(), key=lambda kv: -kv[1]))
    to_async = ", ".join(f"{float(t):.0%}: **{r:.2f}x**" for t, x in p["targets"].items()
                         if (r := x["time_ratio_sync_over_async"]) is not None)
    tail = (f"\nTRL's time to each target / r1mega's: {ratios or 'a target neither side reached'}. "
            f"r1mega's / r1mega async's: {to_async or 'a target neither side reached'}. "
            f"r1mega's training time by phase: {shares}.\n")
    header = ["", *[f"to {float(t):.0%}" for t in p["targets"]], "final accuracy", "training s", "step s"]
    return head + _table(header, rows) + tail


def _packing_md(p: Dict) -> str:
    head = (f"{p['model']}; one optimizer step over the same rows, as THD packs and as right-padded rows, "
            f"micro-batches of {p['micro_batch_tokens']} tokens, timed alternately; tokens/s counts real "
            f"tokens. Long-tailed: lognormal responses, median {p['median_response']}, p99 {p['p99_response']}; "
            f"task: the built-in task's prompts with worked solutions.\n\n")
    rows = []
    for name, s in p["sets"].items():
        for layout in ("packed", "padded"):
            x = s[layout]
            rows.append([name, layout, s["rows"], x["micro_batches"], x["padding_share"], x["tokens_per_s"],
                         x["update_s"], f"{s['speedup']:.2f}x" if layout == "packed" else ""])
    return head + _table(["set", "layout", "rows", "micro-batches", "padding share", "tokens/s", "update s",
                          "packed / padded"], rows)


def _async_md(a: Dict) -> str:
    head = (f"{a['model']} from its pre-trained base checkpoint, {a['algorithm']}, {a['prompts_per_step']} prompts "
            f"x {a['group_size']}, {a['max_new_tokens']} new tokens, {a['steps']} steps per side; synchronous: "
            f"{a['ranks']} data-parallel ranks; asynchronous: {a['ranks'] - a['workers']} trainer rank(s) + "
            f"{a['workers']} rollout worker(s), max_staleness {a['max_staleness']}"
            f"{', partial rollouts' if a['partial'] else ''}; samples/s over steps 2 on; greedy on {a['held_out']} "
            f"held-out prompts after the last step; medians of {a['runs']} alternating run(s).\n\n")
    rows = []
    for side in ("sync", "async"):
        x = a[side]
        shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(x["runs"][0]["phase_share"].items(),
                                                            key=lambda kv: -kv[1]))
        idle = (f"trainer waits {x['trainer_wait_share']:.0%}, workers idle {x['rollout_idle_share']:.0%}, "
                f"staleness {x['staleness_mean']:.2f}") if side == "async" else shares
        rows.append([side, x["samples_per_s"], x["seconds"], x["final_accuracy"], x["reward_mean"], idle])
    tail = (f"\nasync / sync samples/s: **{a['speedup']:.2f}x**; held-out accuracy, async - sync: "
            f"{100 * a['accuracy_gap']:+.1f} points.\n")
    return head + _table(["side", "samples/s", "seconds", "held-out greedy", "reward", "where the time went"],
                         rows) + tail


SECTIONS: Dict[str, tuple] = {
    "step": ("End-to-end GRPO step", _step_md),
    "train": ("Training", _train_md),
    "rollout": ("Rollout", _rollout_md),
    "packing": ("RL update: packed against padded", _packing_md),
    "peer": ("Time to accuracy against TRL", _peer_md),
    "async": ("Synchronous against asynchronous RL", _async_md),
}


def markdown(results: Dict) -> str:
    env = results["environment"]
    parts = [f"# r1mega-bench results\n\n{env['device']}; torch {env['torch']}, megatron-core "
             f"{env['megatron_core']}; commit {env['commit']}; {env['date']}.\n\n"
             f"`{results['command']}`\n"]
    for name, data in results["suites"].items():
        title, render = SECTIONS[name]
        parts.append(f"\n## {title}\n\n" + render(data))
    return "".join(parts)


# -- plots -------------------------------------------------------------------------------

def _figure(path: Path, draw: Callable, data: Dict, size=(6.0, 3.8)) -> Path:
    """draw(ax, data) into a PNG at path, written aside and renamed when complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax, data)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _measured(rows: List[Dict]) -> List[Dict]:
    return [r for r in rows if "tokens_per_s" in r]  # not the skipped ones


def _plot_step(ax, s: Dict) -> None:
    left = 0.0
    for phase, seconds in s["phase_s"].items():
        ax.barh(["GRPO step"], [seconds], left=left, label=phase)
        left += seconds
    ax.set_xlabel("seconds (median step)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title(f"{s['model']}: time per phase")


def _plot_train(ax, t: Dict) -> None:
    rows = _measured(t["rows"])
    labels = [f"{r['model']}\ntp{r['tp']} dp{r['dp']}" + (f" ep{r['ep']}" if r["ep"] > 1 else "") for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.set_title("training throughput by layout")


def _plot_rollout(ax, r: Dict) -> None:
    rows = _measured(r["rows"])
    for line in dict.fromkeys((x["engine"], x.get("prompts", "task")) for x in rows):
        ax.plot(*zip(*[(x["batch_size"], x["tokens_per_s"]) for x in rows
                       if (x["engine"], x.get("prompts", "task")) == line]), marker="o", label=" ".join(line))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize=8)
    ax.set_title(f"{r['model']}: rollout throughput")


def _plot_peer(ax, p: Dict) -> None:
    for key, name, color in (("r1mega", "r1mega", "tab:blue"), ("r1mega_async", "r1mega async", "tab:green"),
                             ("trl", "TRL GRPOTrainer", "tab:orange")):
        for i, run in enumerate(p[key]["runs"]):
            _, seconds, accuracy = zip(*run["curve"])
            ax.plot(seconds, [100 * a for a in accuracy], marker="o", markersize=3, label=None if i else name,
                    color=color, alpha=0.8)
    for t in p["targets"]:
        ax.axhline(100 * float(t), color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.legend()
    ax.set_title(f"{p['model']}: time to accuracy")


def _plot_packing(ax, p: Dict) -> None:
    names = list(p["sets"])
    x = range(len(names))
    for k, (layout, color) in enumerate((("packed", "tab:blue"), ("padded", "tab:gray"))):
        ax.bar([i + 0.4 * k for i in x], [p["sets"][n][layout]["tokens_per_s"] for n in names], 0.4,
               label=layout, color=color)
    ax.set_xticks([i + 0.2 for i in x], names)
    ax.set_ylabel("update tokens/s (real tokens)")
    ax.legend()
    ax.set_title("RL update: " + ", ".join(f"{n} {p['sets'][n]['speedup']:.2f}x" for n in names))


def _plot_async(ax, a: Dict) -> None:
    sides = ("sync", "async")
    ax.bar(range(2), [a[s]["samples_per_s"] for s in sides], color=["tab:gray", "tab:blue"])
    ax.set_xticks(range(2), [f"{s}\n{100 * a[s]['final_accuracy']:.0f}% held-out" for s in sides])
    ax.set_ylabel("samples/s")
    ax.set_title(f"{a['model']}: async / sync {a['speedup']:.2f}x")


PLOTS = {"step": _plot_step, "train": _plot_train, "rollout": _plot_rollout, "packing": _plot_packing,
         "peer": _plot_peer, "async": _plot_async}


def plots(suites: Dict, out: Path) -> List[Path]:
    """One PNG per suite that measured something (a suite of skipped rows draws none)."""
    return [_figure(out / f"{name}.png", PLOTS[name], data) for name, data in suites.items()
            if "rows" not in data or _measured(data["rows"])]
