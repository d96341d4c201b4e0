"""Log-probs + entropy of the sampled tokens, forward and backward, from [tokens, vocab] bf16 logits:
r1mega's kernels (r1mega.ops.logprobs on CUDA) against eager PyTorch and torch.compile of the
same code.

Reports the median time (CUDA events) and the peak memory above the logits themselves, and the
kernels' achieved bandwidth against the floor: one read of the logits forward, one read and one
write backward, at the device's measured copy bandwidth. Where Liger-Kernel is installed, a
second table times the whole GRPO loss from hidden states (the lm_head matmul included, as
Liger fuses it): r1mega's kernels against Liger's fused-linear GRPO loss and eager PyTorch.
Writes benchmarks/results/kernels.json.
Usage: python benchmarks/kernels/bench_logprobs.py [--quick]   (GPU only)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

TOKENS = (4096, 16384, 65536)
VOCABS = (32768, 151936)
WARMUP, REPEATS = 2, 5


def eager(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What a trainer writes without fused kernels: an fp32 log_softmax over the whole vocabulary."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return (weights * (logp + 0.01 * entropy)).sum()


def fused(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from r1mega.ops.logprobs import token_logprobs

    logp, entropy = token_logprobs(logits, targets, with_entropy=True)
    return (weights * (logp + 0.01 * entropy)).sum()


def measure(row: dict, name: str, step, leaves) -> None:
    """row[name_ms], row[name_peak_mb]: the median time (CUDA events) of step() after WARMUP
    calls, and the peak memory above what existed before; None for both when it runs out of memory.
    The leaves' gradients are cleared between calls, untimed."""
    times = []
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(WARMUP + REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            if i >= WARMUP:
                times.append(start.elapsed_time(end))
            for leaf in leaves:
                leaf.grad = None
        row[f"{name}_ms"] = statistics.median(times)
        row[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.OutOfMemoryError:
        row[f"{name}_ms"] = row[f"{name}_peak_mb"] = None
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.empty_cache()


def logprobs_step(fn, leaf: torch.Tensor, targets, weights):
    """Forward + backward of a log-prob loss on the logits `leaf`."""
    def step():
        buffer = leaf * 1.0 if fn is fused else leaf  # the fused op consumes its buffer (output-layer logits)
        fn(buffer, targets, weights).backward()
    return step


HIDDEN = 3584  # Qwen2.5-7B's; the lm_head is [vocab, HIDDEN]
EPS_LOW, EPS_HIGH = 0.2, 0.28


def grpo_r1mega(hidden, weight, targets, adv, old):
    """The trainer's path: lm_head logits, the log-prob kernels, the fused per-token loss."""
    from r1mega.trainer.rl.loss import Surrogate, policy_terms
    from r1mega.ops.logprobs import token_logprobs

    logp, _ = token_logprobs(hidden @ weight.T, targets)
    mask = torch.ones_like(logp, dtype=torch.bool)
    return policy_terms(logp[None], old[None], None, adv[None], mask[None], None,
                        Surrogate(EPS_LOW, EPS_HIGH, None, "token", 0.0, "k3")).loss


def grpo_eager(hidden, weight, targets, adv, old):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ratio = (logp - old).exp()
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH)).mean()


def liger_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=EPS_LOW,
                                  epsilon_high=EPS_HIGH)
    return lambda hidden, weight, targets, adv, old: fn(
        hidden[None], weight, targets[None], torch.ones_like(targets)[None], adv[:1], old_per_token_logps=old[None])[0]


def with_lm_head(tokens) -> list:
    """The loss from hidden states, one advantage per token row (as one sequence)."""
    rows, v = [], VOCABS[-1]
    sides = [("r1mega", grpo_r1mega), ("eager", grpo_eager)]
    if importlib.util.find_spec("liger_kernel"):
        sides.append(("liger", liger_loss()))
    for n in tokens[:2]:
        g = torch.Generator(device="cuda").manual_seed(n)
        hidden = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
        weight = 0.02 * torch.randn(v, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
        targets = torch.randint(0, v, (n,), device="cuda", generator=g)
        adv = torch.full((n,), 0.5, device="cuda")
        old = -torch.rand(n, device="cuda", generator=g) * 12
        row = {"tokens": n, "vocab": v, "hidden": HIDDEN}
        h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
        for name, fn in sides:  # forward + backward w.r.t. hidden states and lm_head
            measure(row, name, lambda: fn(h, w, targets, adv, old).backward(), (h, w))
        rows.append(row)
    return rows


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 4 GiB buffer."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * src.element_size() * 10 / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    quick = "--quick" in sys.argv
    tokens = TOKENS[:2] if quick else TOKENS
    compiled = torch.compile(eager, dynamic=True)
    bandwidth = copy_bandwidth()
    rows = []
    for n in tokens:
        for v in VOCABS:
            g = torch.Generator(device="cuda").manual_seed(n + v)
            logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
            targets = torch.randint(0, v, (n,), device="cuda", generator=g)
            weights = torch.rand(n, device="cuda", generator=g)
            row = {"tokens": n, "vocab": v}
            leaf = logits.requires_grad_(True)
            for name, fn in (("r1mega", fused), ("eager", eager), ("compile", compiled)):
                measure(row, name, logprobs_step(fn, leaf, targets, weights), (leaf,))
            floor_bytes = 3 * logits.numel() * logits.element_size()
            row["r1mega_gb_per_s"] = floor_bytes / (row["r1mega_ms"] / 1e3) / 1e9 if row["r1mega_ms"] else None
            row["share_of_copy_bandwidth"] = row["r1mega_gb_per_s"] / bandwidth if row["r1mega_gb_per_s"] else None
            rows.append(row)
            del logits, leaf
            torch.cuda.empty_cache()
    loss_rows = with_lm_head(tokens)
    liger = "installed" if importlib.util.find_spec("liger_kernel") else "not installed"
    out = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": bandwidth, "dtype": "bf16", "liger": liger,
           "rows": rows, "loss_from_hidden": loss_rows}
    path = Path(__file__).resolve().parents[1] / "results" / "kernels.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{out['device']}: copy {bandwidth:.0f} GB/s; floor = 1 read fwd + 1 read + 1 write bwd of the logits")
    print(f"{'tokens':>7} {'vocab':>7} | {'r1mega ms':>9} {'eager ms':>9} {'compile ms':>10} | "
          f"{'r1mega MB':>9} {'eager MB':>9} | {'GB/s':>6} {'of copy':>7}")
    fmt = lambda x, f: "OOM" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        print(f"{r['tokens']:>7} {r['vocab']:>7} | {fmt(r['r1mega_ms'], '9.2f')} {fmt(r['eager_ms'], '9.2f')} "
              f"{fmt(r['compile_ms'], '10.2f')} | {fmt(r['r1mega_peak_mb'], '9.0f')} {fmt(r['eager_peak_mb'], '9.0f')}"
              f" | {fmt(r['r1mega_gb_per_s'], '6.0f')} {fmt(r['share_of_copy_bandwidth'], '7.0%')}")
    print(f"GRPO loss from hidden states ({HIDDEN} wide, lm_head included; Liger {liger}): ms / peak MB")
    for r in loss_rows:
        print(f"{r['tokens']:>7} {r['vocab']:>7} | " + "  ".join(
            f"{k[:-3]} {fmt(r[k], '.2f')} / {fmt(r[k[:-3] + '_peak_mb'], '.0f')}" for k in r if k.endswith("_ms")))


if __name__ == "__main__":
    main()
