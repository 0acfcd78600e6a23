#!/usr/bin/env bash
# The one launcher every job script uses (see megatron_klear/launch/slurm.py):
#   bash slurm/launch.sh sft|rl --config CONFIG [key=value ...]
# Run inside an allocation (sbatch). Sets the environment defaults of slurm/env.sh, then
# derives the hosts, master address and port from Slurm, validates the config against the
# node count, starts engines if the config puts them on their own nodes, and runs torchrun on
# every trainer node with srun. Its arguments: python -m megatron_klear.launch.slurm --help.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
exec python -m megatron_klear.launch.slurm "$@"
