#!/usr/bin/env bash
# Compile every CUDA source in kernels/csrc to an object file with nvcc (no GPU needed), so a
# syntax or type error fails here. The torch bindings are built on GPU machines only.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
    echo "compile_kernels: nvcc not found; CUDA sources not compiled" >&2
    exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in kernels/csrc/*.cu; do
    nvcc -c -O2 -std=c++17 -arch=sm_90 -Werror all-warnings "$src" -o "$out/$(basename "$src" .cu).o"
done
echo "compile_kernels: $(ls kernels/csrc/*.cu | wc -l) CUDA source(s) compiled with $(nvcc --version | tail -1)"
