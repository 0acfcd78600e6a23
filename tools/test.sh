#!/usr/bin/env bash
# Set up (first time) and run the whole test suite on a CPU machine.
#   bash tools/test.sh [pytest args...]
# Creates .venv in the repo if missing, installs the CPU build of torch from local disk
# (torch==2.13.0: never a multi-GB CUDA build on a CPU machine), the project with its test
# extra, the system packages the tests use, and the pinned SGLang in .venv-sglang. Idempotent: quick the second time.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source tools/setup_env.sh
# The real SGLang server of the real_sglang tests (its own venv, .venv-sglang).
setup_sglang_env

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The install tests (tests/e2e/test_install.py, test_transformers_range.py, test_rollout_env.py)
# ask the package index and keep what they install under $KLEAR_CACHE (default
# ~/.cache/megatron-klear, about 5.5 GB: a venv with SGLang's torch 2.14.1, transformers 4.56 in a
# side folder): keep that folder between CI runs. Measured cold on a loaded 2-core machine: about
# 4 minutes more (229 s for the torch venv, 10 s for the transformers folder); without an index
# the tests skip and say why.
# Without a GPU the Triton kernels run (slowly, for correctness) under the interpreter.
[ -e /dev/nvidia0 ] || export TRITON_INTERPRET=1
# A real one-node Slurm for tests/e2e/test_slurm.py (installs slurmctld/slurmd/munge when root on
# Debian), and a two-node one (network namespaces) for the multinode tests in
# tests/e2e/test_multinode.py, each in its own directory; if one cannot start, its tests skip and
# print why.
STARTED_SLURM=0
if bash tools/local_slurm.sh start; then STARTED_SLURM=1; fi
export KLEAR_SLURM_2N_DIR=${KLEAR_SLURM_2N_DIR:-/tmp/megatron-klear-slurm-2n}
KLEAR_SLURM_DIR=$KLEAR_SLURM_2N_DIR bash tools/local_slurm.sh start --nodes 2 || true
set +e
# --durations: the slowest tests, in CI's log, to keep the suite inside its time
python -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
rc=$?
[ "$STARTED_SLURM" = 1 ] && bash tools/local_slurm.sh stop
KLEAR_SLURM_DIR=$KLEAR_SLURM_2N_DIR bash tools/local_slurm.sh stop # also when a test started it
set -e
if [ "$rc" -eq 5 ]; then
  echo "tools/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
