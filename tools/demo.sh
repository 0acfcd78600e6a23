#!/usr/bin/env bash
# The README's first command: bash tools/demo.sh [--out DIR] [--rl-steps N] [--seed S]
# Sets up .venv on first use, then runs tools/demo.py (data -> SFT -> GPPO RL -> eval -> plot).
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
source tools/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python tools/demo.py "$@"
