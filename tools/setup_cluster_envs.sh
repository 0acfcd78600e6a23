#!/usr/bin/env bash
# Build the two Python environments of a GPU cluster (the README's "Install on a GPU cluster").
#
#   bash tools/setup_cluster_envs.sh [--trainer DIR] [--rollout DIR] [--torch SPEC|keep] [--print]
#
#   --trainer DIR   the trainer's venv (default: .venv). Megatron-Core, Transformer Engine, us.
#   --rollout DIR   the rollout venv (default: .venv-rollout): the `rollout` extra, i.e. SGLang
#                   and its router with the torch and transformers SGLang pins. The trainer
#                   starts SGLang with it: rollout.sglang.python=DIR/bin/python.
#   --torch SPEC    the trainer's torch (default: the torch the rollout venv resolved, e.g.
#                   torch==2.14.1, so that both load the same NCCL and agree on the CUDA IPC
#                   format: the RL start-up refuses a mismatch). `keep`: the torch already in
#                   the trainer venv (a cluster image's own build), as it is.
#   --print         print the commands instead of running them.
#
# Order, and why: the rollout venv first (its resolution decides torch); the trainer venv gets
# that torch, then `pip install -e ".[trainer]"` (CUDA 13 torch) or ".[trainer-cu12]" (CUDA 12):
# Megatron-Core 0.16 and the Transformer Engine core wheel of that CUDA, without touching torch;
# then Transformer Engine's torch extension, published only as source, built with
# --no-build-isolation against that torch (it needs the CUDA toolkit, and takes a while unless
# NVIDIA publishes a prebuilt wheel for the torch version, which its setup tries first).
# Both venvs get a current pip first: pip 23 drops the core_cu13 extra inside our extra.
# Idempotent: run it again after a `git pull`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

TRAINER=.venv ROLLOUT=.venv-rollout TORCH="" PRINT=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --trainer) TRAINER=$2; shift 2 ;;
    --rollout) ROLLOUT=$2; shift 2 ;;
    --torch) TORCH=$2; shift 2 ;;
    --print) PRINT=1; shift ;;
    *) echo "setup_cluster_envs: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

run() {
  echo "+ $*" >&2
  [ "$PRINT" = 1 ] || "$@"
}

venv() {  # venv DIR: create it (once) with a current pip
  [ -x "$1/bin/python" ] || run "$PY" -m venv "$1"
  run "$1/bin/python" -m pip install -q --upgrade pip
}

# 1. rollout: SGLang with its own pins (torch, transformers, flashinfer) in a venv of its own
venv "$ROLLOUT"
run "$ROLLOUT/bin/python" -m pip install "$ROOT[rollout]"

# 2. trainer: the same torch as the rollout venv (or the one already there), then Megatron + TE
venv "$TRAINER"
if [ -z "$TORCH" ]; then
  if [ "$PRINT" = 1 ]; then
    TORCH="torch==<the rollout venv's torch>"
  else
    TORCH="torch==$("$ROLLOUT/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
  fi
fi
if [ "$TORCH" != keep ]; then
  run "$TRAINER/bin/python" -m pip install "$TORCH"
fi
CUDA_MAJOR=13
if [ "$PRINT" != 1 ]; then
  CUDA_MAJOR=$("$TRAINER/bin/python" -c 'import torch; print((torch.version.cuda or "none").split(".")[0])')
fi
case "$CUDA_MAJOR" in
  13) EXTRA=trainer ;;
  12) EXTRA=trainer-cu12 ;;
  *) echo "setup_cluster_envs: the trainer's torch has no CUDA (torch.version.cuda=$CUDA_MAJOR): install a CUDA build (--torch)" >&2; exit 1 ;;
esac
run "$TRAINER/bin/python" -m pip install -e "$ROOT[$EXTRA,wandb]"
if [ "$PRINT" = 1 ]; then
  TE="<the installed transformer-engine version>"
else
  TE=$("$TRAINER/bin/python" -c 'from importlib.metadata import version; print(version("transformer-engine"))')
fi
run "$TRAINER/bin/python" -m pip install --no-build-isolation "transformer-engine-torch==$TE"
run "$TRAINER/bin/python" -c "import torch, transformer_engine.pytorch, megatron.core; print('trainer: torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__)"
run "$ROLLOUT/bin/python" -c "import torch, sglang; print('rollout: torch', torch.__version__, 'sglang', sglang.__version__)"
echo "setup_cluster_envs: done. RL runs take rollout.sglang.python=$(cd "$(dirname "$ROLLOUT")" && pwd)/$(basename "$ROLLOUT")/bin/python" >&2
