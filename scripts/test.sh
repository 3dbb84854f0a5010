#!/usr/bin/env bash
# What `make test` runs once the environment is bootstrapped: ruff; the test suite on PYTEST_WORKERS pytest-xdist
# workers (each test file whole on one worker); then the tests marked `solo` (alerts on the real latency of live
# engines), without the workers' load, and beside them, at the lowest CPU priority, mypy and the instrumentation's
# suites on the other Pythons (scripts/compat.sh): the solo tests mostly wait for alert windows and leave a core and a
# half idle, which those two take (nice 19: a waking engine or gateway gets its core back at once). Their output
# follows the solo tests'.
# Arguments go to both pytest runs. Exit status 5 (nothing selected, as when the arguments pick files of one kind
# only) fails only when neither run selected a test.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
side=$(mktemp -d)
trap 'rm -rf "$side"' EXIT

"$bin/ruff" check . || exit 1
"$bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile -m "not solo" "$@"
parallel=$?
(nice -n 19 "$bin/mypy" >"$side/mypy.log" 2>&1; echo $? >"$side/mypy.rc") &
(nice -n 19 scripts/compat.sh >"$side/compat.log" 2>&1; echo $? >"$side/compat.rc") &
"$bin/python" -m pytest -m solo "$@"
solo=$?
wait
echo "--- mypy"; cat "$side/mypy.log"
echo "--- scripts/compat.sh"; cat "$side/compat.log"

failed=0
[ "$(cat "$side/mypy.rc")" -eq 0 ] || { echo "make test: mypy failed (above)"; failed=1; }
[ "$(cat "$side/compat.rc")" -eq 0 ] || { echo "make test: scripts/compat.sh failed (above)"; failed=1; }
for status in $parallel $solo; do [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || failed=1; done
[ "$parallel" -ne 5 ] || [ "$solo" -ne 5 ] || { echo "make test: no test selected"; failed=1; }
exit $failed
