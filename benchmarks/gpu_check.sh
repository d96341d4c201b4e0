#!/usr/bin/env bash
# Everything that needs a GPU, in one short run (for a machine lent for minutes): builds r1mega's CUDA
# kernels just in time, runs the `gpu` tests (kernels against their PyTorch references, RL end to end
# synchronous and asynchronous, launched ranks on CUDA,
# attention backends; the SGLang test where sglang is installed), times the log-prob kernels
# (benchmarks/kernels; QUICK=1 skips the 64k-token rows), measures the MFU of a dense 1.5B bf16
# training step (r1mega-bench bench=gpu, train suite; results under $OUT or /tmp) and prints a
# summary last.
# Usage: bash benchmarks/gpu_check.sh [PYTHON]   (installs nothing; PYTHONPATH may add a site dir)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
log=$(mktemp)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 1
start=$(date +%s)
"$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu tests/unit/test_ops_advantage.py 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
"$PY" benchmarks/kernels/bench_logprobs.py ${QUICK:+--quick} 2>&1 | tee -a "$log" | tail -12 > "$log.bench"
mfu_dir=${OUT:-/tmp}/gpu-bench
timeout 240 "$PY" -m r1mega.cli.bench bench=gpu 'bench.suites=[train]' bench.output_dir="$mfu_dir" \
    > "$log.mfu" 2>&1 || tail -5 "$log.mfu"
echo
echo "== r1mega gpu_check: $(($(date +%s) - start)) s =="
grep -E "^(FAILED|ERROR|SKIPPED)" "$log" | cut -c1-150
grep -E "passed|failed" "$log" | tail -1
cat "$log.bench"
echo "dense 1.5B bf16 training step (| model | layout | tokens/s | step s | TFLOP/s | MFU | peak MB |):"
grep -E "^\| qwen2.5-1.5b" "$mfu_dir/results.md" 2>/dev/null || echo "  no result (see above)"
exit "$status"
