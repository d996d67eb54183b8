#!/usr/bin/env bash
# `make bench-gpu`: everything a lent GPU should run, in one go, written to docs/benchmarks/.
#
#   1. the kernel tests, where the bfloat16 cases run (the interpreter skips them on a CPU);
#   2. the ahead-of-time check with this device's own properties (SM count, shared memory);
#   3. the kernel benchmarks against torch eager, torch.compile and Liger (if installed).
#
# Each step's output is kept in docs/benchmarks/kernels-<device>-tests.txt, kernels-aot-<device>.md
# and the benchmark's kernels-<device>-<date>.md; the command that made each is at its top.
# Without a CUDA GPU it says so and stops: no figure here is ever produced on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "make bench-gpu needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was measured" >&2
  exit 2
fi
DEVICE=$($PY -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
OUT=docs/benchmarks
mkdir -p "$OUT"
rc=0

cmd="$PY -m pytest -p no:cacheprovider -q -rs tests/test_kernels_*.py"
{ echo "\$ $cmd"; echo; $cmd; } 2>&1 | tee "$OUT/kernels-$DEVICE-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

cmd="$PY -m minigemma.kernels.aot --device cuda --out $OUT/kernels-aot-$DEVICE"
echo "\$ $cmd"; $cmd || rc=1

cmd="$PY -m minigemma.kernels.bench --save $OUT"
echo "\$ $cmd"; $cmd || rc=1
exit $rc
