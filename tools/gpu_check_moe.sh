#!/usr/bin/env bash
# The Qwen3-MoE part of the one-call GPU check, on its own (one GPU: expert parallel 1):
#
#   bash tools/gpu_check_moe.sh [OUTDIR]          # default OUTDIR: runs/gpu_check/moe
#
# Not a step of tools/gpu_check.sh (whose steps fill the GPU machine's 480 s): a call of its own,
# with .whl carried (tools/fetch_gpu_wheels.sh); it installs them into /tmp/site as gpu_check.sh
# does when that folder is not there yet (docs/benchmarks.md).
#
# 1. tests/gpu/test_moe_gpu.py (marked gpu; skipped without CUDA): a tiny Qwen3-MoE on CUDA
#    against transformers (the all-to-all dispatcher, sequential experts, the router's
#    load-balancing loss in the backward, the gather of GPU tensors), then 20 SFT steps;
# 2. SFT throughput of two Qwen3-30B-A3B layers (shape 30b-a3b-2l: the real layer, 128 experts
#    of width 768, top-8; 1.9B parameters with the embeddings, ~34 GB of bf16 weights, fp32
#    gradients and Adam state at DP=1) at 4K tokens x 2 micro-batches, bf16, torch-native
#    layers (no TE on that machine, so sequential experts: the floor grouped GEMM must beat);
#    MFU counts the top-8 experts only;
# 3. OUTDIR/moe_summary.json: each step's command, exit code and seconds, the benchmark's JSON.
# About 2.5 minutes (the tests ~60 s, the benchmark ~60 s); MOE_CHECK_BUDGET_S caps the whole.
# GPU_CHECK_SMOKE=1: the same commands at tiny sizes on a CPU (tests/e2e/test_gpu_check_moe.py).
set -uo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-runs/gpu_check/moe}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/moe_check.log
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${MOE_CHECK_BUDGET_S:-170}
SMOKE=${GPU_CHECK_SMOKE:-0}
START=$(date +%s)
if [ "$SMOKE" != 1 ] && [ ! -d /tmp/site ] && compgen -G ".whl/*.whl" >/dev/null; then
  # a machine gpu_check.sh has not prepared: the carried wheels (tools/fetch_gpu_wheels.sh), as it does
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # the carried wheels
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # known third-party warnings: megatron_klear.known_warnings
STEPS=()

run() {  # run NAME LIMIT_S CMD... under min(LIMIT_S, budget left)
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    STEPS+=("$name	skipped	0	$*")
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  STEPS+=("$name	$rc	$(($(date +%s) - t0))	$*")
  echo "=== $name: exit $rc" | tee -a "$LOG"
}

if [ "$SMOKE" = 1 ]; then
  SHAPE=tiny-moe LEN=64 BENCH_STEPS=2
else
  SHAPE=30b-a3b-2l LEN=4096 BENCH_STEPS=5
fi
run moe_gpu_tests 100 "$PY" -m pytest tests/gpu/test_moe_gpu.py -m gpu -q -p no:cacheprovider -rs \
  --junitxml="$OUT/moe_gpu_tests.xml"
run "moe_sft_${SHAPE}_${LEN}" 70 "$PY" tools/bench_throughput.py --mode sft --shape "$SHAPE" --seq-len "$LEN" \
  --steps "$BENCH_STEPS" --micro-batches 2 --peak-tflops 989 --json "$OUT/bench_moe_sft.json"

printf '%s\n' "${STEPS[@]}" | "$PY" -c '
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = []
for line in sys.stdin.read().splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    steps.append(dict(name=name, rc=None if rc == "skipped" else int(rc), seconds=float(secs), command=cmd))
bench = out / "bench_moe_sft.json"
ok = all(s["rc"] == 0 for s in steps)
summary = dict(ok=ok, smoke=sys.argv[2] == "1", steps=steps, benchmark=json.loads(bench.read_text()) if bench.exists() else None)
(out / "moe_summary.json").write_text(json.dumps(summary, indent=1))
print("moe summary:", out / "moe_summary.json", "(all passed)" if ok else "(FAILURES)")
sys.exit(0 if ok else 1)
' "$OUT" "$SMOKE" | tee -a "$LOG"
exit "${PIPESTATUS[1]}"
