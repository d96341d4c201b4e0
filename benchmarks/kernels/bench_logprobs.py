"""Log-probs + entropy of the sampled tokens, forward and backward, from [tokens, vocab] bf16 logits:
r1mega's kernels (r1mega.ops.logprobs on CUDA) against eager PyTorch and torch.compile of the
same code.

Reports the median time (CUDA events) and the peak memory above the logits themselves, and the
kernels' achieved bandwidth against the floor: one read of the logits forward, one read and one
write backward, at the device's measured copy bandwidth. Writes benchmarks/results/kernels.json.
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


def timed(fn, logits: torch.Tensor, targets, weights) -> tuple[float, float]:
    """(median ms of forward + backward, peak MB above the inputs)."""
    leaf = logits.detach().requires_grad_(True)
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(WARMUP + REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        buffer = leaf * 1.0 if fn is fused else leaf  # the fused op consumes its buffer (output-layer logits)
        fn(buffer, targets, weights).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
        leaf.grad = None
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


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
            for name, fn in (("r1mega", fused), ("eager", eager), ("compile", compiled)):
                try:
                    row[f"{name}_ms"], row[f"{name}_peak_mb"] = timed(fn, logits, targets, weights)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = row[f"{name}_peak_mb"] = None
                    torch.cuda.empty_cache()
            floor_bytes = 3 * logits.numel() * logits.element_size()
            row["r1mega_gb_per_s"] = floor_bytes / (row["r1mega_ms"] / 1e3) / 1e9
            row["share_of_copy_bandwidth"] = row["r1mega_gb_per_s"] / bandwidth
            rows.append(row)
            del logits
            torch.cuda.empty_cache()
    # Liger-Kernel's GRPO loss takes hidden states and fuses the lm_head matmul: other work, not timed here
    liger = "installed (fuses the lm_head; not timed)" if importlib.util.find_spec("liger_kernel") else "not installed"
    out = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": bandwidth, "dtype": "bf16", "liger": liger,
           "rows": rows}
    path = Path(__file__).resolve().parents[1] / "results" / "kernels.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\n{out['device']}: copy {bandwidth:.0f} GB/s; floor = 1 read fwd + 1 read + 1 write bwd of the logits")
    print(f"{'tokens':>7} {'vocab':>7} | {'r1mega ms':>9} {'eager ms':>9} {'compile ms':>10} | "
          f"{'r1mega MB':>9} {'eager MB':>9} | {'GB/s':>6} {'of copy':>7}")
    fmt = lambda x, f: "OOM" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        print(f"{r['tokens']:>7} {r['vocab']:>7} | {fmt(r['r1mega_ms'], '9.2f')} {fmt(r['eager_ms'], '9.2f')} "
              f"{fmt(r['compile_ms'], '10.2f')} | {fmt(r['r1mega_peak_mb'], '9.0f')} {fmt(r['eager_peak_mb'], '9.0f')}"
              f" | {r['r1mega_gb_per_s']:6.0f} {r['share_of_copy_bandwidth']:7.0%}")


if __name__ == "__main__":
    main()
