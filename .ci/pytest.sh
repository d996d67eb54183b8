#!/usr/bin/env bash
# The whole suite: unit and parity tests, grading tests, and every chapter through nbval.
# pytest's exit code 5 ("no tests collected") is a failure here, never a pass.
#
# With no arguments the two halves run side by side, one pytest each, so that both cores work: the
# chapters (matrix products: torch's 2 threads in each notebook's kernel) and the tests (mostly Python:
# Triton's interpreter, the grader, subprocesses; 1 torch thread). The tests stream here; the chapters'
# report follows when both are done. With arguments (`make test PYTEST_ARGS="-k rope"`) one pytest runs them.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest --nbval-lax -p no:cacheprovider)

status() {  # pytest's exit code -> ours
  if [ "$1" -eq 5 ]; then echo "error: pytest collected no tests${2:+ in $2}" >&2; echo 1; else echo "$1"; fi
}

if [ "$#" -gt 0 ]; then
  "${PYTEST[@]}" "$@"
  exit "$(status $?)"
fi

log=$(mktemp -t minigemma-chapters.XXXXXX)
trap 'rm -f "$log"' EXIT
# OMP_WAIT_POLICY=passive: a thread waiting for work sleeps instead of spinning on a core the other half needs
OMP_WAIT_POLICY=passive "${PYTEST[@]}" chapters > "$log" 2>&1 &
chapters=$!
OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "${PYTEST[@]}" tests
rc_tests=$(status $? tests)
wait "$chapters"
rc_chapters=$(status $? chapters)
echo
echo "================================ chapters (nbval) ================================"
cat "$log"
if [ "$rc_tests" -ne 0 ] || [ "$rc_chapters" -ne 0 ]; then
  echo "FAILED: tests exit $rc_tests, chapters exit $rc_chapters" >&2
  exit 1
fi
echo "passed: the tests and the chapters"
