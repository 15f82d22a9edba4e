#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs ruff, mypy and pytest, and prints a summary.
# Every step runs even when an earlier one failed; the exit code is non-zero if any failed.
# pytest exit code 5 (no test collected) counts as a failure.
#   scripts/test.sh                    the whole suite
#   scripts/test.sh tests/unit -x      arguments replace the default pytest target `tests`
#   ZEST_PYTEST_TIMEOUT=SECONDS        hard limit for pytest (default 3000)
set -uo pipefail
cd "$(dirname "$0")/.."
exec </dev/null

start=$(date +%s)
if ! bash scripts/install.sh; then
  echo "test: install failed; nothing was tested" >&2
  exit 1
fi

# One private temp dir per run, so parallel runs never share a path; removed at exit.
RUN_TMP=$(mktemp -d "${TMPDIR:-/tmp}/zest-test.XXXXXX")
export ZEST_TEST_RUN_TMP=$RUN_TMP
cleanup() {
  # Anything a crashed test left mounted under our dir goes first, deepest first.
  awk -v root="$RUN_TMP" '$5 == root || index($5, root "/") == 1 { print $5 }' \
    /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$RUN_TMP"
}
trap cleanup EXIT

PY=.venv/bin/python
declare -a names=() codes=()
step() {
  local name=$1
  shift
  printf '\n=== %s: %s\n' "$name" "$*"
  "$@"
  local rc=$?
  names+=("$name")
  codes+=("$rc")
}

step ruff "$PY" -m ruff check --no-cache .
step mypy "$PY" -m mypy chunkstore snapshotter _native
if [ "$#" -eq 0 ]; then
  set -- tests
fi
step pytest timeout --kill-after=60 "${ZEST_PYTEST_TIMEOUT:-3000}" \
  "$PY" -m pytest -q -p no:cacheprovider --basetemp="$RUN_TMP/pytest" "$@"

failed=0
printf '\n=== summary (%ss)\n' "$(($(date +%s) - start))"
for i in "${!names[@]}"; do
  rc=${codes[$i]}
  case "${names[$i]}:$rc" in
    *:0) verdict=ok ;;
    pytest:5) verdict="FAILED (no test was collected)" ;;
    pytest:124 | pytest:137) verdict="FAILED (timed out)" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || failed=1
  printf '  %-7s %s\n' "${names[$i]}" "$verdict"
done
exit "$failed"
