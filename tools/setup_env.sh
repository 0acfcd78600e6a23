#!/usr/bin/env bash
# Sourced by tools/test.sh and tools/demo.sh: make .venv ready and activate it.
# A stamp of the install inputs makes the second run a no-op.
set -euo pipefail
if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced: the usage above
  case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

log() { echo "[setup] $*" >&2; }

install_system_packages() {
  # Only where we are root on Debian/Ubuntu and something is missing; never fatal for
  # optional tools (tests that need them say why they skip).
  local want=()
  command -v firejail >/dev/null 2>&1 || want+=(firejail)
  command -v bwrap >/dev/null 2>&1 || want+=(bubblewrap)
  if [ ${#want[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing system packages: ${want[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}") >/dev/null 2>&1 \
      || log "could not install ${want[*]}; tests that need them will skip and say so"
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

STAMP="$VENV/.megatron_klear_installed"
INPUTS=$(cat "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$INPUTS" ]; then
  if ! python -c 'import torch' 2>/dev/null; then
    log "installing torch==2.13.0 (the CPU build lies on our machines' disk)"
    python -m pip install -q "torch==2.13.0"
  fi
  log "installing megatron-klear with the test extra"
  python -m pip install -q -e "$ROOT[test]"
  install_system_packages
  echo "$INPUTS" > "$STAMP"
fi

# The pinned SGLang server and router, for the real_sglang tests, in a venv of their own:
# sglang 0.5.23 pins torch==2.14.1 and transformers==5.19.0, which clash with the trainer's
# megatron-core 0.16 environment, so the engine starts servers with rollout.sglang.python.
# The lean CPU route (tests/sglang_standins/README.md): the CPU build of torch, sglang and sglang-router without
# their dependencies, then sglang's own requirements minus the CUDA-only ones
# (tools/sglang_cpu_requirements.py), plus triton. A stamp of the inputs makes it a no-op later.
SGLANG_PINS=(sglang==0.5.23 sglang-router==0.3.2)
SGLANG_VENV="$ROOT/.venv-sglang"
setup_sglang_env() {
  local stamp="$SGLANG_VENV/.installed" inputs
  inputs=$(cat "$ROOT/tools/setup_env.sh" "$ROOT/tools/sglang_cpu_requirements.py" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
    log "installing ${SGLANG_PINS[*]} into $SGLANG_VENV (CPU, about 2 minutes and 3.5 GB)"
    [ -x "$SGLANG_VENV/bin/python" ] || "$PY" -m venv "$SGLANG_VENV"
    local pip=("$SGLANG_VENV/bin/python" -m pip install -q)
    "${pip[@]}" "torch==2.13.0" triton packaging
    "${pip[@]}" --no-deps "${SGLANG_PINS[@]}"
    "$SGLANG_VENV/bin/python" "$ROOT/tools/sglang_cpu_requirements.py" > "$SGLANG_VENV/cpu-requirements.txt"
    # the constraint keeps every dependency on the CPU build of torch
    echo "torch==2.13.0" > "$SGLANG_VENV/constraints.txt"
    "${pip[@]}" -r "$SGLANG_VENV/cpu-requirements.txt" -c "$SGLANG_VENV/constraints.txt"
    echo "$inputs" > "$stamp"
  fi
  export KLEAR_SGLANG_PYTHON="$SGLANG_VENV/bin/python"
}
