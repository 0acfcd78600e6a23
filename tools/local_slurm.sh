#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests of slurm/ (and for trying the job
# scripts by hand). Debian's slurmctld + slurmd + munge, one node, one partition.
#
#   bash tools/local_slurm.sh start    # install if needed (root + apt), start, wait until idle
#   bash tools/local_slurm.sh env      # print `export SLURM_CONF=...` for sbatch/squeue/scancel
#   bash tools/local_slurm.sh stop
#
# Everything lives in $KLEAR_SLURM_DIR (default /tmp/megatron-klear-slurm): its own slurm.conf
# (pointed to by SLURM_CONF), state, spool and logs, so a machine's real Slurm config is never
# touched. On failure it prints why and exits 1; the tests then skip and quote that reason.
set -euo pipefail

DIR=${KLEAR_SLURM_DIR:-/tmp/megatron-klear-slurm}
CONF="$DIR/slurm.conf"
log() { echo "[local_slurm] $*" >&2; }
die() { log "$*"; exit 1; }

install_packages() {
  local want=()
  command -v slurmctld >/dev/null 2>&1 || want+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || want+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || want+=(slurm-client)
  command -v munged >/dev/null 2>&1 || want+=(munge)
  [ ${#want[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${want[*]} and not root: cannot install them"
  command -v apt-get >/dev/null 2>&1 || die "missing ${want[*]} and no apt-get to install them"
  log "installing ${want[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}") >"$DIR/apt.log" 2>&1 \
    || die "apt-get install ${want[*]} failed: see $DIR/apt.log"
}

free_port() {
  # First port from $1 upward that nothing listens on (slurmctld and slurmd need one each).
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}

write_conf() {
  local host cpus mem ctld_port d_port
  host=$(hostname -s)
  cpus=$(nproc)
  # Leave the OS some memory; Slurm refuses a node that reports less than RealMemory.
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  ctld_port=$(free_port 16817)
  d_port=$(free_port $((ctld_port + 1)))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
# Written by tools/local_slurm.sh: a one-node cluster for tests.
ClusterName=klear-local
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! munge -n >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then
      su -s /bin/sh munge -c "munged --force" >"$DIR/log/munged.out" 2>&1 || munged --force >>"$DIR/log/munged.out" 2>&1
    else
      munged --force >"$DIR/log/munged.out" 2>&1
    fi
  fi
  for _ in $(seq 20); do munge -n >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "munged did not start: see $DIR/log/munged.out"
}

running() {
  [ -f "$CONF" ] && SLURM_CONF=$CONF timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'
}

start() {
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd needs root (uid $(id -u))"
  mkdir -p "$DIR"
  if running; then
    log "already running ($CONF)"
    return 0
  fi
  install_packages
  stop_daemons
  write_conf
  start_munge
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld did not start: see $DIR/log/slurmctld.log"
  slurmd -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 || die "slurmd did not start: see $DIR/log/slurmd.log"
  for _ in $(seq 60); do
    if running; then
      log "up: SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  die "node never became idle: see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

stop_daemons() {
  local f
  for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons; log "stopped" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' ;;
  *) die "usage: $0 start|stop|env" ;;
esac
