#!/usr/bin/env bash
# CI: README command 1 (the demo), then the test suite again from another working directory while two CPU-bound
# processes compete for the cores. The result must not depend on any of that, and no test may write into the
# checkout or the working directory. Needs .venv (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
.venv/bin/python deepnet_supervisor.py --sweep demo --workers 2 > /tmp/demo_sweep.log 2>&1 || {
  tail -20 /tmp/demo_sweep.log; echo "check_after_demo: the demo sweep failed" >&2; exit 1; }
before=$(git status --porcelain --ignored --untracked-files=all)
elsewhere=$(mktemp -d)
hogs=()
for _ in 1 2; do python3 -c "while True: pass" & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null || true; rm -rf "$elsewhere"' EXIT
(cd "$elsewhere" && "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/tests")
after=$(git status --porcelain --ignored --untracked-files=all)
if [ "$before" != "$after" ]; then
  echo "check_after_demo: the tests changed the checkout:" >&2; diff <(echo "$before") <(echo "$after") >&2; exit 1
fi
if [ -n "$(ls -A "$elsewhere")" ]; then
  echo "check_after_demo: the tests wrote into the working directory: $(ls -A "$elsewhere")" >&2; exit 1
fi
echo "check_after_demo: same result after the demo, from another directory, under load; nothing written"
