#!/usr/bin/env bash
# Every GPU check in one call, sized for our GPU test machine (see tools/gpu_check.py, or --help):
#
#   bash tools/fetch_gpu_wheels.sh           # here, with internet: the wheels that machine lacks -> .whl/
#   bash tools/gpu_check.sh "$OUT"           # there: results into the folder given, nothing elsewhere
#   GPU_CHECK_SMOKE=1 bash tools/gpu_check.sh DIR   # the same steps at tiny sizes on a CPU
#
# docs/benchmarks.md ("The GPU check") gives the exact call on our GPU test machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# --help without Python's dependencies: tools/gpu_check.py's docstring (its usage and its steps)
case "${1:-}" in -h | --help) sed -n '2,/^"""$/p' tools/gpu_check.py | sed 's/^"""//'; exit 0 ;; esac
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
