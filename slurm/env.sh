# Sourced by slurm/launch.sh on the batch node; srun passes the environment on to every node.
# Every value is a default: export your own before sbatch (or in KLEAR_ENV_FILE) to override.
#
# Python: $KLEAR_VENV (default: the repo's .venv when it exists; otherwise whatever `python`
# is on PATH, e.g. a module or conda env activated before sbatch).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced: the usage above
  case "${1:-}" in -h | --help) sed -n '1,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
fi
KLEAR_ROOT=${KLEAR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export KLEAR_ROOT
if [ -n "${KLEAR_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$KLEAR_VENV/bin/activate"
elif [ -x "$KLEAR_ROOT/.venv/bin/python" ] && [ "${VIRTUAL_ENV:-}" != "$KLEAR_ROOT/.venv" ]; then
  # shellcheck disable=SC1091
  source "$KLEAR_ROOT/.venv/bin/activate"
fi
export PYTHONPATH="$KLEAR_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- NCCL on H100 InfiniBand clusters -------------------------------------------------------
# Fail a hung collective instead of blocking the allocation until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# IB retries for congested fabrics (NCCL's defaults give up early on large jobs).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# GPUDirect RDMA when the NIC and GPU share a PCIe switch.
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
# Leave NCCL_SOCKET_IFNAME / NCCL_IB_HCA unset unless your cluster needs them (site specific):
#   export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5
# Megatron's TP communication overlap needs one hardware queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# One OpenMP thread per rank by default: data workers and tokenizers would oversubscribe.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# Clusters are usually offline for the hub: use local model directories.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export PYTHONUNBUFFERED=1

# Site additions (module loads, proxies, ...).
if [ -n "${KLEAR_ENV_FILE:-}" ]; then
  # shellcheck disable=SC1090
  source "$KLEAR_ENV_FILE"
fi
