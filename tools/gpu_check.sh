#!/usr/bin/env bash
# Every GPU check in one command, for our GPU test machine (one H200 or H100, Python 3.12,
# torch + CUDA and triton preinstalled, no internet), within 8 minutes:
#
#   bash tools/fetch_gpu_wheels.sh          # here, with internet: the wheels the machine lacks -> .whl/
#   bash tools/gpu_check.sh [OUTDIR]        # there (default OUTDIR: runs/gpu_check)
#
# 1. installs the wheels carried in .whl/ (megatron-core, math-verify and its parsers) into
#    /tmp/site and puts it first on PYTHONPATH;
# 2. runs the tests marked gpu (tests/gpu): the Megatron model on CUDA (torch-native spec) vs HF,
#    the Triton kernels compiled and run vs the torch reference and float64, 20 SFT steps,
#    3 RL steps with the HF engine on the GPU, the weight gather of a converted checkpoint, the
#    colocated sync's CUDA IPC payloads rebuilt by another process (SGLang's reading side);
# 3. runs the benchmarks: the log-prob kernel table (tokens 4K/16K/32K x local vocab 152K/38K;
#    Triton first, then the eager and torch.compile baselines), SFT MFU of the Qwen3 0.6B and
#    1.7B shapes at 4K and 8K, weight gather GB/s;
# 4. writes OUTDIR/gpu_check.log (everything), OUTDIR/gpu_tests.xml (JUnit) and
#    OUTDIR/summary.json (each step's command, exit code and seconds, and every benchmark's JSON).
#
# Each step has its own time limit, all of them share an overall budget (GPU_CHECK_BUDGET_S,
# default 470 s; a step that no longer fits is recorded as skipped), and a failing step does not
# stop the ones after it. Exit code 1 if any step failed or was skipped.
# GPU_CHECK_SMOKE=1 runs the same commands at tiny sizes on a CPU (tests/unit/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SMOKE=${GPU_CHECK_SMOKE:-0}
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD... : run CMD under min(LIMIT_S, budget left), log it, record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    say "=== $name: skipped, ${left}s of the budget left"
    local cmd="$*"
    printf '%s\tskipped\t0\t%s\n' "$name" "${cmd//$'\n'/ }" >>"$WORK/steps.tsv"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "=== $name (limit ${limit}s): $*"
  local t0 rc ms secs
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  ms=$((($(date +%s%N) - t0) / 1000000))
  secs=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  local cmd="$*"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "${cmd//$'\n'/ }" >>"$WORK/steps.tsv"
  say "=== $name: exit $rc after ${secs}s"
}

# 1. carried wheels (never on a CPU smoke run: they are for the GPU machine's Python 3.12)
if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  step install_wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
  say "no .whl/*.whl: using the installed packages (bash tools/fetch_gpu_wheels.sh fetches them)"
fi
step environment 60 "$PY" -c "
import json, torch, triton, transformers, megatron.core as mc
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps(dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                      transformers=transformers.__version__, megatron_core=mc.__version__)))"

# 2. the tests marked gpu (skipped without CUDA)
step gpu_tests 270 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/gpu_tests.xml"

# 3. benchmarks (the same flags in a smoke run, at tiny sizes on the CPU)
if [ "$SMOKE" = 1 ]; then
  KERNEL_SIZES=(--device cpu --tokens 64 --vocab 512 --iters 2)
  KERNEL_IMPL=eager BASELINE_IMPLS=(eager)
  SFT_SHAPES=(tiny) SFT_LENS=(64) SFT_STEPS=2 GATHER_SHAPE=tiny
else
  KERNEL_SIZES=(--tokens 4096 16384 32768 --vocab 151936 37984 --iters 20)
  KERNEL_IMPL=triton BASELINE_IMPLS=(eager compile)
  SFT_SHAPES=(0.6b 1.7b) SFT_LENS=(4096 8192) SFT_STEPS=5 GATHER_SHAPE=0.6b
fi
step kernel_triton 60 "$PY" tools/bench_gppo_kernel.py "${KERNEL_SIZES[@]}" --impls "$KERNEL_IMPL" \
  --json "$WORK/bench_kernel_triton.json"
for shape in "${SFT_SHAPES[@]}"; do
  for len in "${SFT_LENS[@]}"; do
    step "sft_${shape}_${len}" 45 "$PY" tools/bench_throughput.py --mode sft --shape "$shape" --seq-len "$len" \
      --steps "$SFT_STEPS" --micro-batches 2 --peak-tflops 989 --json "$WORK/bench_sft_${shape}_${len}.json"
  done
done
step gather 40 "$PY" tools/bench_weight_sync.py --shape "$GATHER_SHAPE" --bucket-mb 512 \
  --json "$WORK/bench_gather.json"
step kernel_baselines 110 "$PY" tools/bench_gppo_kernel.py "${KERNEL_SIZES[@]}" --impls "${BASELINE_IMPLS[@]}" \
  --json "$WORK/bench_kernel_baselines.json"

# 4. summary: every step, every benchmark's JSON
"$PY" - "$WORK" "$OUT/summary.json" "$SMOKE" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path

work, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs, cmd = line.split("\t", 3)
    steps.append(dict(name=name, rc=None if rc == "skipped" else int(rc), skipped=rc == "skipped",
                      seconds=float(secs), command=cmd))
benchmarks = {p.stem.removeprefix("bench_"): json.loads(p.read_text()) for p in sorted(work.glob("bench_*.json"))}
ok = all(s["rc"] == 0 for s in steps)
out.write_text(json.dumps(dict(ok=ok, smoke=smoke, steps=steps, benchmarks=benchmarks), indent=1))
print(f"{'step':<20} {'exit':>7} {'seconds':>8}")
for s in steps:
    print(f"{s['name']:<20} {'skipped' if s['skipped'] else s['rc']:>7} {s['seconds']:>8.1f}")
print(f"summary: {out} ({'all passed' if ok else 'FAILURES'})")
sys.exit(0 if ok else 1)
EOF
