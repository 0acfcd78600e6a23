#!/usr/bin/env bash
# The Transformer Engine check, for a GPU machine that has TE (our GPU test machine has none: TE's
# core wheel, ~180 MB, is over its 64 MiB transfer limit, and transformer-engine-torch is source
# only). The runner, limits, memory plan and output of tools/gpu_check.sh, with these steps:
#
#   bash tools/gpu_check_te.sh OUTDIR [--plan] [--free-gib GIB]
#
# 1. environment (TE's version among the rest), 2. the tests marked gpu, the TE ones included
#    (tests/gpu/test_gpu_te.py: the TE layer spec against HF transformers; SFT in FP8 with the
#    tensorwise and the delayed recipe against bf16), 3. SFT MFU with TE's attention: Qwen3-1.7B
#    at 4K in bf16 and in FP8 with each recipe, at 16K with full recompute, and with two GPUs or
#    more TP=2 + sequence parallel + FP8 at 8K.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec "${PYTHON:-python3}" tools/gpu_check.py --te "$@"
