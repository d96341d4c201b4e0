#!/usr/bin/env bash
# Run one stack's tests (extra arguments go to pytest). R1MEGA_STACK=current (default) runs the
# whole suite in .venv; R1MEGA_STACK=newest runs, in .venv-py312, the tests that
# tests/newest-stack.txt lists (extra arguments follow the list). See scripts/stack.sh.
# For the current stack, as root, it first starts the one-node Slurm cluster of
# slurm/local-cluster.sh for the `slurm` tests and stops it afterwards; elsewhere (or with
# R1MEGA_SLURM=off, or SLURM_CONF already set) those tests use the cluster SLURM_CONF names or
# are skipped.
# Tests run on R1MEGA_TEST_WORKERS pytest-xdist workers (default: half the CPU count, 2 to 8; 0
# runs them in this process). Most of a test's time is spent starting processes and waiting on
# gloo and Slurm, so two workers on two cores finish the suite in about two thirds of one worker's
# time; a third worker there, its tests' ranks oversubscribing the cores, took twice as long.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stack.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
workers=${R1MEGA_TEST_WORKERS:-$(half=$(( $(nproc) / 2 )); echo $(( half < 2 ? 2 : half > 8 ? 8 : half )))}
selection=()
what="the whole suite"
if [ "$STACK" = newest ]; then
    mapfile -t selection < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' tests/newest-stack.txt | grep -v '^$')
    what="the ${#selection[@]} paths of tests/newest-stack.txt"
fi
what+=" on $workers workers${*:+ (pytest $*)}"
echo "== stack $STACK ($VENV: $(stack_versions)): $what"
if [ "$STACK" = current ] && [ "$(id -u)" = 0 ] && [ -z "${SLURM_CONF:-}" ] && [ "${R1MEGA_SLURM:-on}" != off ]; then
    export R1MEGA_SLURM_DIR=${R1MEGA_SLURM_DIR:-/tmp/r1mega-slurm-test-$$}
    trap 'slurm/local-cluster.sh stop' EXIT
    slurm/local-cluster.sh start
    eval "$(slurm/local-cluster.sh env)"
fi
# the CUDA sources once (current stack); the bindings against each stack's torch headers
if [ "$STACK" = current ]; then VENV=$VENV bash scripts/compile_kernels.sh; else VENV=$VENV bash scripts/compile_kernels.sh --bindings-only; fi
# the slowest tests are listed at the end: what to trim when the suite nears CI's 30 minutes
"$VENV/bin/python" -m pytest -q -n "$workers" --dist worksteal --durations=25 "${selection[@]}" "$@"
