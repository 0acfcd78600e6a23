#!/usr/bin/env bash
# Sourced by tools/test.sh and tools/demo.sh: make .venv ready and activate it.
# A stamp of the install inputs makes the second run a no-op.
set -euo pipefail
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
