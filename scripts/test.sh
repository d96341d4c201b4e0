#!/usr/bin/env bash
# Run the test suite (extra arguments go to pytest). As root, it first starts the one-node
# Slurm cluster of slurm/local-cluster.sh for the `slurm` tests and stops it afterwards;
# elsewhere (or with R1MEGA_SLURM=off, or SLURM_CONF already set) those tests use the
# cluster SLURM_CONF names or are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ "$(id -u)" = 0 ] && [ -z "${SLURM_CONF:-}" ] && [ "${R1MEGA_SLURM:-on}" != off ]; then
    export R1MEGA_SLURM_DIR=${R1MEGA_SLURM_DIR:-/tmp/r1mega-slurm-test-$$}
    trap 'slurm/local-cluster.sh stop' EXIT
    slurm/local-cluster.sh start
    eval "$(slurm/local-cluster.sh env)"
fi
bash scripts/compile_kernels.sh
.venv/bin/python -m pytest -q "$@"
