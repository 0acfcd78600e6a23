#!/usr/bin/env bash
# The main job on an embedded default: bash tools/demo.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
python tools/demo.py "$@"
