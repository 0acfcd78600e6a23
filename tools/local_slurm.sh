#!/usr/bin/env bash
# A real Slurm on this machine, for the tests of slurm/ (and for trying the job scripts by hand).
# Debian's slurmctld + slurmd + munge (Slurm 22.05), one partition.
#
#   bash tools/local_slurm.sh start [--nodes N]  # install if needed (root + apt), start, wait until idle
#   bash tools/local_slurm.sh env                # print `export SLURM_CONF=...` for sbatch/squeue/scancel
#   bash tools/local_slurm.sh nodes              # the compute nodes' names, one a line
#   bash tools/local_slurm.sh kill-node NAME     # N > 1: cut NAME off the network, kill its slurmd and jobs
#   bash tools/local_slurm.sh revive-node NAME   # N > 1: reconnect NAME and start its slurmd again
#   bash tools/local_slurm.sh stop               # everything started is stopped and removed
#
# Everything lives in $KLEAR_SLURM_DIR (default /tmp/megatron-klear-slurm): its own slurm.conf
# (pointed to by SLURM_CONF), state, spool and logs, so a machine's real Slurm config is never
# touched. On failure it prints why and exits 1; the tests then skip and quote that reason.
#
# --nodes 1 (the default): one slurmd on this host, under its own hostname; munge is the
# machine's (started if needed and left running: other local clusters share it).
#
# --nodes N > 1: N simulated compute nodes with real kernel networking. Debian's Slurm is not
# built with multiple-slurmd support, so each node is a network namespace (`ip netns`) with a
# UTS namespace (its own hostname) running its own slurmd, with per-node spool, pid and log
# files. The script creates, and `stop` removes again:
#   * a bridge holding the controller's address on a private /24 (10.213.X.0/24: the first X
#     whose addresses and routes are unused on this machine; KLEAR_SLURM_SUBNET=10.a.b pins
#     it), and per node a veth pair: one end in the bridge, the other (`klnet0`) in the node's
#     namespace with the address .(10 + i). No other interface, address or route is touched.
#   * the names: controller kl<tag>c, nodes kl<tag>n1..N (tag: 4 hex digits of a hash of
#     $KLEAR_SLURM_DIR, so clusters in other directories never collide), in a block of
#     /etc/hosts that begins and ends with a marker line naming the tag;
#   * slurmctld on the bridge address, under `unshare --uts` (it must run where the hostname is
#     SlurmctldHost); each slurmd under `nsenter --net` + `unshare --uts` (not `ip netns exec`,
#     whose fresh /sys lacks the cgroup tree that slurmd reads at start-up);
#   * a munged of its own (socket in $KLEAR_SLURM_DIR/munge, AuthInfo=socket=...), reachable
#     from every namespace because a Unix socket is a path.
# Timeouts: SlurmdTimeout=300 as Slurm's default (a node that stops answering is declared DOWN
# after it; KLEAR_SLURMD_TIMEOUT changes it); cred_expire=20 s instead of Slurm's 120
# (KLEAR_SLURM_CRED_EXPIRE): a requeued job waits that long before it may start again.
# `stop` kills the daemons by pid file and then every process left in the node namespaces
# (job steps), deletes the namespaces (which deletes the veths), the bridge and the hosts block,
# and names anything that is still there (exit 1).
set -euo pipefail

DIR=${KLEAR_SLURM_DIR:-/tmp/megatron-klear-slurm}
CONF="$DIR/slurm.conf"
STATE="$DIR/cluster.env" # what a multi-node start created, for `stop` and the node commands
HOSTS=/etc/hosts
LOCK=/run/lock/klear-local-slurm.lock # one network set-up at a time on this machine
log() { echo "[local_slurm] $*" >&2; }
die() {
  log "$*"
  exit 1
}

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

common_conf() {
  # The slurm.conf lines every cluster shares; $1 = cluster name.
  cat <<EOF
ClusterName=$1
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
# On a loaded 2-core machine a killed step can take over a minute to exit (seen once with the
# default 60 s): the node would be drained ("Kill task failed") and no later job would run.
UnkillableStepTimeout=180
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
EOF
}

node_memory() {
  # Leave the OS some memory; Slurm refuses a node that reports less than RealMemory.
  awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo
}

write_conf() {
  local host ctld_port d_port
  host=$(hostname -s)
  ctld_port=$(free_port 16817)
  d_port=$(free_port $((ctld_port + 1)))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  {
    echo "# Written by tools/local_slurm.sh: a one-node cluster for tests."
    common_conf klear-local
    cat <<EOF
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdTimeout=60
NodeName=$host CPUs=$(nproc) RealMemory=$(node_memory) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  } >"$CONF"
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

idle_nodes() {
  # How many nodes of this cluster are up (idle, mixed or allocated); 0 when it is not running.
  [ -f "$CONF" ] || {
    echo 0
    return
  }
  SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mix|alloc)' || true
}

start_one() {
  install_packages
  stop_multi # a multi-node cluster left in this directory
  stop_one
  write_conf
  rm -rf "$DIR/state" && mkdir -p "$DIR/state" # no job or drained node recovered from an earlier run
  start_munge
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld did not start: see $DIR/log/slurmctld.log"
  slurmd -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 || die "slurmd did not start: see $DIR/log/slurmd.log"
  wait_idle 1
}

wait_idle() {
  for _ in $(seq 120); do
    if [ "$(idle_nodes)" = "$1" ]; then
      log "up: $1 node(s), SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  die "the nodes never became idle: see $DIR/log/slurmctld.log and $DIR/log/slurmd*.log"
}

stop_one() {
  local pids=()
  pids+=($(kill_pidfile "$DIR/slurmd.pid" "$CONF"))
  pids+=($(kill_pidfile "$DIR/slurmctld.pid" "$CONF"))
  wait_gone "${pids[@]}"
}

# --- N > 1: network-namespaced nodes ------------------------------------------------------------
name_cluster() {
  # Names of everything a multi-node cluster in $DIR creates (deterministic in $DIR).
  TAG=$(printf %s "$DIR" | md5sum | cut -c1-4)
  CTL=kl${TAG}c
  BRIDGE=klbr$TAG
  MARK="klear-local-slurm $TAG"
}

node_name() { echo "kl${TAG}n$1"; }
node_ns() { echo "klear-$TAG-n$1"; }
node_veth() { echo "klv${TAG}n$1"; }

subnet_free() {
  # True when nothing on this machine uses 10.a.b.0/24 ($1 = "10.a.b"): no address, and no
  # route other than the default one that covers it.
  local net=$1
  ip -4 -o addr show | grep -qF " $net." && return 1
  ip -4 route show match "$net.0/24" | grep -vq '^default' && return 1
  return 0
}

pick_subnet() {
  if [ -n "${KLEAR_SLURM_SUBNET:-}" ]; then
    [[ $KLEAR_SLURM_SUBNET =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "KLEAR_SLURM_SUBNET must look like 10.a.b, got $KLEAR_SLURM_SUBNET"
    subnet_free "$KLEAR_SLURM_SUBNET" || die "KLEAR_SLURM_SUBNET=$KLEAR_SLURM_SUBNET.0/24 is in use on this machine"
    echo "$KLEAR_SLURM_SUBNET"
    return
  fi
  local first=$((16#$TAG % 200 + 20)) x
  for i in $(seq 0 199); do
    x=$(((first + i) % 200 + 20))
    subnet_free "10.213.$x" && {
      echo "10.213.$x"
      return
    }
  done
  die "no free 10.213.X.0/24 subnet on this machine (set KLEAR_SLURM_SUBNET=10.a.b)"
}

save_state() {
  cat >"$STATE" <<EOF
NODES=$NODES
SUBNET=$SUBNET
EOF
}

create_network() {
  # Bridge + one namespace and veth per node; every name is checked to be new first.
  local i ns
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "interface $BRIDGE exists already (another cluster with tag $TAG?)"
  for i in $(seq "$NODES"); do
    ip netns list | grep -qw "$(node_ns "$i")" && die "namespace $(node_ns "$i") exists already"
    ip link show "$(node_veth "$i")" >/dev/null 2>&1 && die "interface $(node_veth "$i") exists already"
  done
  save_state # from here on `stop` knows what to remove
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq "$NODES"); do
    ns=$(node_ns "$i")
    ip netns add "$ns"
    ip link add "$(node_veth "$i")" type veth peer name klnet0 netns "$ns"
    ip link set "$(node_veth "$i")" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev klnet0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set klnet0 up
  done
}

hosts_block() {
  local i
  echo "# BEGIN $MARK ($DIR)"
  echo "$SUBNET.1 $CTL"
  for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) $(node_name "$i")"; done
  echo "# END $MARK"
}

edit_hosts() {
  # Drop our block from the hosts file (and add it again with $1 = add). Written in place:
  # the file may be a bind mount, which a rename would break.
  local tmp
  tmp=$(mktemp)
  awk -v b="# BEGIN $MARK " -v e="# END $MARK" \
    'index($0, b) == 1 {skip = 1} !skip {print} skip && $0 == e {skip = 0}' "$HOSTS" >"$tmp"
  [ "${1:-}" = add ] && hosts_block >>"$tmp"
  cat "$tmp" >"$HOSTS"
  rm -f "$tmp"
}

start_own_munge() {
  local d="$DIR/munge"
  mkdir -p "$d"
  chmod 755 "$DIR" "$d" # munged wants every directory above its socket searchable by all
  [ -s "$d/munge.key" ] || dd if=/dev/urandom of="$d/munge.key" bs=1024 count=1 status=none
  chmod 400 "$d/munge.key"
  munged --socket="$d/munge.socket" --pid-file="$d/munged.pid" --log-file="$d/munged.log" \
    --seed-file="$d/munged.seed" --key-file="$d/munge.key" >>"$DIR/log/munged.out" 2>&1 \
    || die "munged did not start: see $d/munged.log"
  for _ in $(seq 20); do munge -n -S "$d/munge.socket" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "munged does not answer on $d/munge.socket: see $d/munged.log"
}

write_multi_conf() {
  local ctld_port i nodes
  # A port derived from the tag, so that clusters started at the same time do not race for one.
  ctld_port=$(free_port $((17000 + 16#$TAG % 400 * 2)))
  nodes="kl${TAG}n[1-$NODES]"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  {
    echo "# Written by tools/local_slurm.sh: $NODES namespaced nodes on one machine, for tests."
    common_conf "klear-$TAG"
    cat <<EOF
SlurmctldHost=$CTL($SUBNET.1)
SlurmctldPort=$ctld_port
SlurmdPort=6818
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${KLEAR_SLURM_CRED_EXPIRE:-20}
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdTimeout=${KLEAR_SLURMD_TIMEOUT:-300}
EOF
    for i in $(seq "$NODES"); do
      echo "NodeName=$(node_name "$i") NodeAddr=$SUBNET.$((10 + i)) CPUs=$(nproc) RealMemory=$(node_memory) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } >"$CONF"
}

start_slurmd() {
  # slurmd of node $1 inside its namespaces: its network, and a UTS namespace with its hostname.
  local name
  name=$(node_name "$1")
  nsenter --net="/run/netns/$(node_ns "$1")" unshare --uts \
    sh -c "hostname $name && exec slurmd -f '$CONF'" >>"$DIR/log/slurmd-$name.out" 2>&1 \
    || die "slurmd of $name did not start: see $DIR/log/slurmd-$name.log"
}

start_multi() {
  install_packages
  stop_multi
  name_cluster
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock 9
  SUBNET=$(pick_subnet)
  create_network
  edit_hosts add
  flock -u 9
  exec 9>&-
  rm -rf "$DIR/log" # a fresh cluster, fresh logs
  mkdir -p "$DIR/log"
  start_own_munge
  write_multi_conf
  rm -rf "$DIR/state" "$DIR/spool" # a fresh cluster: no jobs recovered from an earlier one
  mkdir -p "$DIR/state" "$DIR/spool"
  export SLURM_CONF=$CONF
  unshare --uts sh -c "hostname $CTL && exec slurmctld -f '$CONF'" >>"$DIR/log/slurmctld.out" 2>&1 \
    || die "slurmctld did not start: see $DIR/log/slurmctld.log"
  for i in $(seq "$NODES"); do start_slurmd "$i"; done
  wait_idle "$NODES"
  log "nodes $(node_name 1)..$(node_name "$NODES") on $SUBNET.0/24 (bridge $BRIDGE)"
}

ours() {
  # True when process $1 runs with $2 on its command line (a pid file may be stale, and its
  # pid reused by a process that is none of ours).
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}

kill_pidfile() {
  # SIGTERM the process in pid file $1 if it still runs with $2 on its command line; prints its pid.
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  [[ $pid =~ ^[0-9]+$ ]] && ours "$pid" "$2" && kill "$pid" 2>/dev/null && echo "$pid"
  return 0
}

kill_namespace_processes() {
  # Every process in namespace $1 (slurmd, job steps and what they started): signal $2 (TERM
  # by default), then KILL what is left after 5 s.
  local ns=$1 sig=${2:-TERM} pids
  ip netns list | grep -qw "$ns" || return 0
  for _ in $(seq 20); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill "-$sig" $pids 2>/dev/null || true
    sleep 0.25
  done
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

alive() {
  # True while process $1 runs (a zombie is dead: this machine's PID 1 may reap it late).
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

wait_gone() {
  # Wait up to 10 s for each of the processes $@ to end, then SIGKILL it.
  local pid
  for pid in "$@"; do
    for _ in $(seq 40); do
      alive "$pid" || break
      sleep 0.25
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  return 0
}

stop_multi() {
  # Everything the start made, removed; a step that fails does not stop the others, and what
  # is left at the end is named (exit 1).
  [ -f "$STATE" ] || return 0
  load_state
  local pids=() i ns f
  pids+=($(kill_pidfile "$DIR/slurmctld.pid" "$CONF"))
  for f in "$DIR"/run/slurmd-*.pid; do pids+=($(kill_pidfile "$f" "$CONF")); done
  for i in $(seq "$NODES"); do kill_namespace_processes "$(node_ns "$i")"; done
  pids+=($(kill_pidfile "$DIR/munge/munged.pid" "$DIR/munge/"))
  wait_gone "${pids[@]}"
  exec 9>"$LOCK"
  flock 9
  for i in $(seq "$NODES"); do
    ns=$(node_ns "$i")
    if ip netns list | grep -qw "$ns"; then ip netns del "$ns" || true; fi
    # Deleting the namespace deletes its veth pair (possibly a moment later).
    ip link del "$(node_veth "$i")" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" || true; fi
  edit_hosts || true
  flock -u 9
  exec 9>&-
  local left
  left=$(leftovers "${pids[@]}")
  [ -z "$left" ] || die "stop left behind: $left"
  rm -f "$STATE" "$DIR"/run/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"
  log "stopped $NODES namespaced node(s) (tag $TAG): namespaces, veths, bridge $BRIDGE, hosts block, daemons"
}

leftovers() {
  # What of this cluster still exists (pids $@ are its daemons): empty when nothing.
  local i pid out=()
  for pid in "$@"; do alive "$pid" && out+=("process $pid"); done
  for i in $(seq "$NODES"); do
    ip netns list | grep -qw "$(node_ns "$i")" && out+=("namespace $(node_ns "$i")")
    ip link show "$(node_veth "$i")" >/dev/null 2>&1 && out+=("interface $(node_veth "$i")")
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && out+=("bridge $BRIDGE")
  grep -qF "# BEGIN $MARK " "$HOSTS" && out+=("the block '$MARK' in $HOSTS")
  echo "${out[*]}"
}

load_state() {
  [ -f "$STATE" ] || die "no multi-node cluster in $DIR"
  # shellcheck disable=SC1090
  source "$STATE"
  name_cluster
}

node_index() {
  # The index i of node name $1 in this cluster (kl<tag>n<i>); needs load_state.
  local i
  for i in $(seq "$NODES"); do
    [ "$(node_name "$i")" = "$1" ] && {
      echo "$i"
      return
    }
  done
  die "no node $1 in this cluster (nodes: $(node_name 1)..$(node_name "$NODES"))"
}

kill_node() {
  # A node failure: its link goes down first (so that no FIN or RST reaches its peers: they see
  # silence, as after a power loss or a partition), then its slurmd and every process on it die.
  local i
  load_state
  i=$(node_index "$1")
  ip link set "$(node_veth "$i")" down
  kill_namespace_processes "$(node_ns "$i")" KILL
  rm -f "$DIR/run/slurmd-$1.pid"
  log "node $1 is cut off and its processes are killed"
}

revive_node() {
  # The node comes back as a repaired node does: Slurm is told it was down (so that nothing
  # waits any longer for what ran there: a job still completing on it completes), its link
  # and slurmd come back, and it returns to service. Call it once the jobs that used the node
  # have ended (marking a node down kills and requeues the jobs still running on it).
  # It returns once slurmctld has delivered the requests it queued for the node while it was
  # away (signals and kills of the old job steps, retried every 60 s: sdiag's agent queue is
  # empty again). A job requeued earlier keeps its id and step ids, and such a late kill would
  # end its new run; Slurm's 120 s default cred_expire covers that, our 20 s does not.
  local i
  load_state
  i=$(node_index "$1")
  SLURM_CONF=$CONF scontrol update NodeName="$1" State=DOWN Reason="revived by local_slurm.sh"
  kill_namespace_processes "$(node_ns "$i")" KILL # a node that was not dead is rebooted
  ip link set "$(node_veth "$i")" up
  start_slurmd "$i"
  # ReturnToService=2 may have returned it already, then RESUME is refused: either way it is up
  SLURM_CONF=$CONF scontrol update NodeName="$1" State=RESUME 2>/dev/null || true
  local t
  for t in $(seq 400); do
    if [ "$t" = 400 ]; then
      die "node $1 did not return to service, or slurmctld still queues requests (sdiag): see $DIR/log/"
    fi
    SLURM_CONF=$CONF sinfo -h -n "$1" -o %t | grep -qE '^(idle|mix|alloc)$' \
      && SLURM_CONF=$CONF sdiag | grep -qE '^Agent queue size: +0$' && break
    sleep 0.5
  done
  log "node $1 is back (slurmd restarted, nothing queued for it)"
}

# --- commands -------------------------------------------------------------------------------------
start() {
  local nodes=1
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes)
        nodes=${2:-}
        shift 2 || die "--nodes needs a number"
        ;;
      --nodes=*)
        nodes=${1#--nodes=}
        shift
        ;;
      *) die "unknown option $1 (usage: start [--nodes N])" ;;
    esac
  done
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd needs root (uid $(id -u))"
  mkdir -p "$DIR"
  local up
  up=$(idle_nodes)
  if [ "$up" != 0 ]; then
    [ "$up" = "$nodes" ] || die "a cluster with $up node(s) runs in $DIR: stop it first"
    log "already running ($CONF)"
    return 0
  fi
  NODES=$nodes
  if [ "$nodes" = 1 ]; then start_one; else start_multi; fi
}

stop() {
  if [ -f "$STATE" ]; then stop_multi; else stop_one; fi
  log "stopped"
}

nodes() {
  SLURM_CONF=$CONF sinfo -h -N -o %N | sort -u
}

case "${1:-}" in
  start)
    shift
    start "$@"
    ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' ;;
  nodes) nodes ;;
  kill-node) kill_node "${2:?usage: kill-node NAME}" ;;
  revive-node) revive_node "${2:?usage: revive-node NAME}" ;;
  *) die "usage: $0 start [--nodes N]|stop|env|nodes|kill-node NAME|revive-node NAME" ;;
esac
