#!/usr/bin/env bash
# Run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m pytest -q "$@"
