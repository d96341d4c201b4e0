#!/usr/bin/env bash
# `make test`: set up both tested stacks (README: Tested matrix; scripts/stack.sh) with test
# dependencies and run their tests: the whole suite on the current stack, then the tests that
# tests/newest-stack.txt lists on the newest one. The newest stack installs (downloads and
# unpacking) while the current stack's tests run; its log is shown if it fails. Both stacks'
# tests run whatever the other's verdict; the exit status is non-zero if either failed. Without a
# Python 3.12 the newest stack is skipped with a notice, except under CI (CI set), where it fails.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
elapsed() { printf '%dm%02ds' $(( (SECONDS - start) / 60 )) $(( (SECONDS - start) % 60 )); }

bash scripts/setup.sh dev || exit
echo "== stack current set up after $(elapsed)"
newest_log=$(mktemp)
trap 'rm -f "$newest_log" "${current_out:-}" "${newest_out:-}"' EXIT
if [ -z "${CI:-}" ] && ! (. scripts/stack.sh && python312 >/dev/null 2>&1); then
    echo "== stack newest: skipped: no Python 3.12 here (python3.12 on PATH, or pyenv install 3.12)"
    bash scripts/test.sh
    exit
fi
( s=$SECONDS; R1MEGA_STACK=newest bash scripts/setup.sh dev && echo "setup took $(( SECONDS - s )) s" ) \
    >"$newest_log" 2>&1 &
newest_setup=$!

current_out=$(mktemp)
bash scripts/test.sh 2>&1 | tee "$current_out"
current=${PIPESTATUS[0]}
echo "== stack current tested after $(elapsed)"

newest_out=$(mktemp)
if wait "$newest_setup"; then
    grep -v "is ignored: it is neither a file nor a directory" "$newest_log" | tail -n 5
    R1MEGA_STACK=newest bash scripts/test.sh 2>&1 | tee "$newest_out"
    newest=${PIPESTATUS[0]}
else
    newest=$?
    cat "$newest_log"
    echo "== stack newest: set-up failed (exit $newest)"
fi
echo "== both stacks done after $(elapsed)"

# One closing line over both stacks, from pytest's own (e.g. "666 passed, 153 skipped in 1234.5s").
summary() { grep -E '^=* *[0-9]+ [a-z]+.* in [0-9.]+s' "$1" | tail -n 1 | sed -E 's/=+//g; s/ in [0-9.]+s.*//; s/^ +//'; }
count() { grep -oE "[0-9]+ $2" <<<"$1" | grep -oE '^[0-9]+' || echo 0; }
c=$(summary "$current_out"); n=$(summary "$newest_out")
echo "stack current: ${c:-no pytest summary} (exit $current)"
echo "stack newest: ${n:-no pytest summary} (exit $newest)"
passed=$(( $(count "$c" passed) + $(count "$n" passed) ))
failed=$(( $(count "$c" failed) + $(count "$n" failed) + $(count "$c" error) + $(count "$n" error) ))
skipped=$(( $(count "$c" skipped) + $(count "$n" skipped) ))
echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$current" = 0 ] && [ "$newest" = 0 ]
