#!/usr/bin/env bash
# Compile every CUDA source in kernels/csrc to an object file with nvcc (no GPU needed), so a
# syntax or type error fails here. The torch bindings are built on GPU machines only.
# Usage: scripts/compile_kernels.sh [--bindings-only]  (the bindings check alone: the CUDA sources
# do not depend on torch). VENV (default .venv) names the environment whose torch headers are used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! command -v nvcc >/dev/null; then
    echo "compile_kernels: nvcc not found; CUDA sources not compiled" >&2
    exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "${1:-}" != --bindings-only ]; then
    for src in kernels/csrc/*.cu; do
        nvcc -c -O2 -std=c++17 -arch=sm_90 -Werror all-warnings "$src" -o "$out/$(basename "$src" .cu).o"
    done
    echo "compile_kernels: $(ls kernels/csrc/*.cu | wc -l) CUDA source(s) compiled with $(nvcc --version | tail -1)"
fi
# The torch bindings: a syntax and type check against this torch's headers. A CPU wheel lacks one
# generated CUDA header (build macros only); an empty one stands in for it.
if command -v g++ >/dev/null && [ -x "$VENV/bin/python" ]; then
    mkdir -p "$out/include/c10/cuda/impl" && echo "#pragma once" > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
    read -r -a includes < <("$VENV/bin/python" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
    cuda_include=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
    [ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include=/usr/local/cuda/include
    # as setup.py's ahead-of-time build compiles it (with the sources' digest)
    digest=$("$VENV/bin/python" -c "from r1mega.ops.kernel_sources import digest; print(digest())")
    g++ -std=c++20 -fsyntax-only "${includes[@]}" -I"$cuda_include" -I"$out/include" \
        -DTORCH_EXTENSION_NAME=_kernels -DR1MEGA_SOURCES_DIGEST="$digest" kernels/csrc/bindings.cpp
    echo "compile_kernels: kernels/csrc/bindings.cpp checked against torch's headers"
fi
