"""The one Slurm launcher behind every job script in ``slurm/`` (via ``slurm/launch.sh``).

Inside an allocation (``sbatch``), ``python -m megatron_klear.launch.slurm sft|rl --config C
[key=value ...]``:

1. reads Slurm's environment: the hosts (``scontrol show hostnames $SLURM_JOB_NODELIST``), the
   processes per node (``KLEAR_PROCS_PER_NODE``, else the GPUs Slurm gave the node, else 1)
   and the requeue count;
2. loads and validates the config with the trainer's own config class and checks that the
   world size (trainer nodes x processes per node) fits the parallel sizes and batch layout,
   all before anything is launched;
3. RL with SGLang in ``distributed`` mode and ``rollout.sglang.nodes > 0``: the last nodes of
   the allocation run only engines. One ``srun`` step starts the servers there and the router
   on the first of them (``engines`` sub-command below), the launcher waits for
   ``/health`` of each (failing the job with the log path if one exits or does not come up in
   ``startup_timeout_s``), points the trainer at them and stops them when training ends. In
   ``colocated`` mode the trainer's rank 0 starts and supervises the engines on its node itself
   (CUDA IPC needs them there), so there is nothing for the launcher to do;
4. starts ``torchrun`` on each trainer node with one ``srun`` task per node (static
   rendezvous: the first trainer host and a free port), through the per-node agent
   (``launch.node``), which sets ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` on its node
   (``parallel.socket_ifname``, else the environment's, else the interface holding the node's
   address towards the master: ``launch.network``) and says in the node's log where it runs;
   per-node logs go to ``OUTPUT_DIR/logs/``;
5. waits for the step and exits with its status. When a node's trainers fail (a collective
   timed out: ``parallel.timeout_minutes``) while ``srun`` still waits for a node that reports
   nothing ``STEP_GRACE_S`` later (it died, or the network to it is cut, so Slurm cannot end
   its tasks either), the launcher says which node is silent, stops ``srun`` and exits with the
   failed node's status instead of holding the allocation until Slurm declares the node down.
   A requeued job (``--requeue``; ``scontrol requeue``) simply starts again: the trainers
   resume from the latest checkpoint.
6. the time limit: the job scripts ask Slurm for ``SIGUSR1`` some minutes before it
   (``#SBATCH --signal=B:USR1@600``, to this process, the batch shell). On it the launcher asks
   the trainer to stop (``OUTPUT_DIR/stop_requested``): the trainer checkpoints at the end of
   its step and exits (``training.lifecycle``), and the launcher requeues the job
   (``scontrol requeue``), which resumes from that checkpoint. A 48 h limit no longer ends a
   59 h run; the warning must leave time for one step and one checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_klear.config import load_config
from megatron_klear.distributed import free_port
from megatron_klear.errors import ConfigError, EngineError, LaunchError
from megatron_klear.inference.http import wait_healthy
from megatron_klear.inference.sglang_servers import router_command, server_command, server_environment, spawn_logged
from megatron_klear.launch.network import choose_socket_ifname
from megatron_klear.launch.node import exit_file
from megatron_klear.training.lifecycle import STOP_FILE, STOPPED_FILE

# entry -> (trainer module, "module:ConfigClass")
ENTRIES = {
    "sft": ("megatron_klear.sft", "megatron_klear.sft.config:SFTConfig"),
    "rl": ("megatron_klear.rl", "megatron_klear.rl.config:RLConfig"),
}
# How long the launcher waits for srun after a node's trainers failed. srun ends the other
# nodes' tasks by itself within seconds (--kill-on-bad-exit) when it can reach them; a node
# still silent after this is dead or cut off, and srun would wait for it until Slurm declares
# the node down (SlurmdTimeout, 300 s by default).
STEP_GRACE_S = 30.0


@dataclass
class SlurmJob:
    """What the launcher needs from Slurm's environment."""

    job_id: str
    hosts: list[str]
    procs_per_node: int
    restart_count: int = 0
    cpus_per_node: Optional[int] = None

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "SlurmJob":
        env = dict(os.environ if env is None else env)
        if "SLURM_JOB_ID" not in env:
            raise LaunchError("not inside a Slurm allocation (SLURM_JOB_ID is unset): submit with sbatch")
        hosts = expand_hostnames(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        cpus = env.get("SLURM_CPUS_ON_NODE")
        return cls(
            job_id=env["SLURM_JOB_ID"],
            hosts=hosts,
            procs_per_node=procs_per_node(env),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            cpus_per_node=int(cpus) if cpus and cpus.isdigit() else None,
        )


def expand_hostnames(nodelist: str) -> list[str]:
    """Slurm's compressed node list (``gpu[01-03,07]``) as host names, via ``scontrol``."""
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is empty")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {e}") from None
    hosts = out.split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} returned no hosts")
    return hosts


def procs_per_node(env: dict) -> int:
    """Trainer processes per node: ``KLEAR_PROCS_PER_NODE``, else the node's GPUs, else 1."""
    explicit = env.get("KLEAR_PROCS_PER_NODE")
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise LaunchError(f"KLEAR_PROCS_PER_NODE must be a positive integer, got {explicit!r}")
        return int(explicit)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").split(":")[-1]  # "h100:8" -> "8"
        if value.isdigit() and int(value) > 0:
            return int(value)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return 1


@dataclass
class EnginePlan:
    """SGLang servers on engine-only nodes (RL, distributed mode)."""

    hosts: list[str]
    server_urls: list[str]
    router_url: str
    timeout_s: float


@dataclass
class LaunchPlan:
    entry: str
    config: str
    overrides: list[str]
    output_dir: Path
    trainer_hosts: list[str]
    procs_per_node: int
    master_addr: str
    master_port: int
    engines: Optional[EnginePlan] = None
    notes: list[str] = field(default_factory=list)
    socket_ifname: str = ""  # parallel.socket_ifname: empty = the environment's, else from the address

    def status_dir(self, job: "SlurmJob") -> Path:
        """Where the node agents of this job's training step write their exit status."""
        return self.output_dir / "logs" / f"{self.entry}-{job.job_id}.status"

    @property
    def trainer_overrides(self) -> list[str]:
        """The user's overrides plus where the engines are (they are up before training)."""
        if self.engines is None:
            return list(self.overrides)
        e = self.engines
        urls = "[" + ",".join(e.server_urls) + "]"
        return list(self.overrides) + [
            "rollout.sglang.launch=false",
            f"rollout.sglang.server_urls={urls}",
            f"rollout.sglang.router_url={e.router_url}",
            f"rollout.sglang.nccl_master_address={self.master_addr}",
        ]


def load_entry_config(entry: str, config: str, overrides: list[str]):
    """The trainer's own typed config (validated): errors name the field or the file."""
    if entry not in ENTRIES:
        raise LaunchError(f"unknown entry {entry!r}; choose one of {sorted(ENTRIES)}")
    if not os.access(config, os.R_OK) and Path(config).is_file():
        raise LaunchError(f"config {config} is not readable")
    module, _, cls_name = ENTRIES[entry][1].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return load_config(cls, config, overrides)


def check_world(cfg, world: int, where: str) -> None:
    """The parallel sizes and the batch layout must fit ``world`` trainer processes."""
    par = cfg.parallel
    model_parallel = par.tp * par.pp * getattr(par, "context_parallel", 1)
    if world % model_parallel:
        raise LaunchError(
            f"{where} give {world} trainer processes, not a multiple of parallel.tp x parallel.pp "
            f"(x context_parallel) = {model_parallel}: change the node count, KLEAR_PROCS_PER_NODE or the "
            "parallel sizes"
        )
    try:  # the expert layout too (world a multiple of expert TP x EP x PP)
        par.data_parallel_size(world)
    except ConfigError as e:
        raise LaunchError(f"{where} give {world} trainer processes: {e}") from None
    dp = world // model_parallel
    if hasattr(cfg, "batch_layout"):
        try:
            cfg.batch_layout(dp)
        except ConfigError as e:
            raise LaunchError(f"{where} give data-parallel size {dp}: {e}") from None


def plan_launch(entry: str, config: str, overrides: list[str], job: SlurmJob, this_host: str = "") -> LaunchPlan:
    """Validate everything and decide who runs what; raises LaunchError / ConfigError."""
    cfg = load_entry_config(entry, config, overrides)
    hosts = list(job.hosts)
    engines: Optional[EnginePlan] = None
    notes: list[str] = []
    if entry == "rl" and cfg.rollout.engine == "sglang":
        sg = cfg.sglang_config()
        n_engine_nodes = sg.nodes
        if sg.mode == "distributed" and n_engine_nodes > 0:
            if n_engine_nodes >= len(hosts):
                raise LaunchError(
                    f"rollout.sglang.nodes={n_engine_nodes} leaves no trainer node in a {len(hosts)}-node job"
                )
            if sg.replicas % n_engine_nodes:
                raise LaunchError(
                    f"rollout.sglang.replicas={sg.replicas} is not divisible by rollout.sglang.nodes={n_engine_nodes}"
                )
            engine_hosts, hosts = hosts[-n_engine_nodes:], hosts[:-n_engine_nodes]
            per_node = sg.replicas // n_engine_nodes
            engines = EnginePlan(
                hosts=engine_hosts,
                server_urls=[f"http://{h}:{sg.port + i}" for h in engine_hosts for i in range(per_node)],
                router_url=f"http://{engine_hosts[0]}:{sg.router_port}",
                timeout_s=sg.startup_timeout_s,
            )
        elif n_engine_nodes > 0:
            raise LaunchError("rollout.sglang.nodes > 0 needs rollout.sglang.mode=distributed (CUDA IPC is node-local)")
        elif sg.mode == "colocated" and len(hosts) > 1:
            notes.append(
                "colocated SGLang engines run on the first node only (CUDA IPC is node-local); "
                "use mode=distributed with rollout.sglang.nodes for engines on their own nodes"
            )
    world = len(hosts) * job.procs_per_node
    check_world(cfg, world, f"{len(hosts)} trainer node(s) x {job.procs_per_node} process(es)")
    master = hosts[0]
    this_host = this_host or socket.gethostname().split(".")[0]
    # The batch script runs on the first node, which is the master: bind-test the port there.
    # Elsewhere a job-id-derived port keeps concurrent jobs on shared nodes apart.
    base = 20000 + int(job.job_id) % 20000 if job.job_id.isdigit() else 29500
    port = free_port(base, host="") if master.split(".")[0] == this_host else base
    return LaunchPlan(
        entry=entry,
        config=config,
        overrides=list(overrides),
        output_dir=Path(cfg.output_dir),
        trainer_hosts=hosts,
        procs_per_node=job.procs_per_node,
        master_addr=master,
        master_port=port,
        engines=engines,
        notes=notes,
        socket_ifname=cfg.parallel.socket_ifname,
    )


def trainer_command(plan: LaunchPlan, job: SlurmJob) -> list[str]:
    """``srun`` (one task per trainer node) running the node agent (``launch.node``: socket
    interface, exit status), which runs ``torchrun`` with a static rendezvous."""
    module = ENTRIES[plan.entry][0]
    n = len(plan.trainer_hosts)
    log = plan.output_dir / "logs" / f"{plan.entry}-%j-node%n.log"
    torchrun = [
        "torchrun",
        f"--nnodes={n}",
        f"--nproc-per-node={plan.procs_per_node}",
        f"--master-addr={plan.master_addr}",
        f"--master-port={plan.master_port}",
        "--node-rank=$SLURM_NODEID",
        "-m",
        module,
        "--config",
        plan.config,
        *plan.trainer_overrides,
    ]
    # $SLURM_NODEID differs per task: expand it on the node, quote everything else.
    script = " ".join(a if a == "--node-rank=$SLURM_NODEID" else shlex.quote(a) for a in torchrun)
    srun = [
        "srun",
        f"--nodes={n}",
        f"--ntasks={n}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(plan.trainer_hosts)}",
        "--kill-on-bad-exit=1",
        f"--output={log}",
        "--open-mode=append",
    ]
    if job.cpus_per_node:
        srun.append(f"--cpus-per-task={job.cpus_per_node}")
    agent = [sys.executable, "-m", "megatron_klear.launch.node", f"--master={plan.master_addr}"]
    agent += [f"--procs-per-node={plan.procs_per_node}", f"--exit-dir={plan.status_dir(job)}"]
    if plan.socket_ifname:
        agent.append(f"--socket-ifname={plan.socket_ifname}")
    return srun + agent + ["--", "bash", "-c", "exec " + script]


def engines_command(plan: LaunchPlan) -> list[str]:
    """``srun`` (one task per engine node) running this module's ``engines`` agent."""
    e = plan.engines
    log = plan.output_dir / "logs" / "engines-%j-%N.log"
    return [
        "srun",
        f"--nodes={len(e.hosts)}",
        f"--ntasks={len(e.hosts)}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(e.hosts)}",
        f"--output={log}",
        "--open-mode=append",
        sys.executable,
        "-m",
        "megatron_klear.launch.slurm",
        "engines",
        "--config",
        plan.config,
        *plan.overrides,
        f"rollout.sglang.nccl_master_address={plan.master_addr}",  # where the weight-update group meets
    ]


def wait_for_engines(plan: LaunchPlan, proc: subprocess.Popen) -> None:
    """Every server and the router answer ``/health``, or LaunchError naming the log."""

    e = plan.engines
    logs = plan.output_dir / "logs"
    deadline = time.time() + e.timeout_s
    checks = [(e.router_url, "/health")] + [(u, "/health_generate") for u in e.server_urls]
    for url, path in checks:
        try:
            wait_healthy(url, max(1.0, deadline - time.time()), path=path, alive=lambda: proc.poll() is None)
        except EngineError as err:
            raise LaunchError(
                f"SGLang engine {url} did not come up ({err}); see {logs}/engines-*.log and {logs}/sglang/"
            ) from None


def node_exits(status_dir: Path, nodes: int) -> dict[int, int]:
    """The exit status each node agent of a step has reported so far, by node index."""
    found = {}
    for node in range(nodes):
        try:
            found[node] = int(exit_file(status_dir, node).read_text().strip())
        except (OSError, ValueError):  # not written (yet)
            continue
    return found


def wait_for_step(
    proc: subprocess.Popen, status_dir: Path, hosts: list[str], grace_s: float = STEP_GRACE_S, poll_s: float = 1.0
) -> tuple[int, list[str]]:
    """The training step's status, and the hosts found silent: ``srun``'s own status, or, when a
    node's trainers failed and some other node reports nothing ``grace_s`` later, the failed
    node's status and the silent hosts (the caller stops ``srun``)."""
    failed: Optional[tuple[int, int, float]] = None  # (node, status, when)
    while True:
        try:
            return proc.wait(timeout=poll_s), []
        except subprocess.TimeoutExpired:
            pass
        exits = node_exits(status_dir, len(hosts))
        if failed is None:
            bad = sorted((node, rc) for node, rc in exits.items() if rc != 0)
            if bad:
                failed = (*bad[0], time.time())
                print(
                    f"[launch] node {bad[0][0]} ({hosts[bad[0][0]]}) failed with exit {bad[0][1]}: waiting up to "
                    f"{grace_s:.0f} s for srun to end the step on the other nodes",
                    flush=True,
                )
        elif time.time() - failed[2] > grace_s:
            silent = [hosts[n] for n in range(len(hosts)) if n not in exits]
            if silent:
                print(
                    f"[launch] no exit status from {', '.join(silent)} {grace_s:.0f} s after node {failed[0]} "
                    f"({hosts[failed[0]]}) failed: {'that node' if len(silent) == 1 else 'those nodes'} died or "
                    "cannot be reached; stopping the step",
                    flush=True,
                )
                return failed[1], silent


class _Children:
    """Child process groups to stop on SIGTERM (scancel, time limit, requeue) and at exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def start(self, cmd: list[str], log: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.Popen:
        """Start ``cmd`` in its own process group (with ``env`` added to ours); its output to
        ``log`` when given."""
        if log is None:
            p = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **(env or {})})
        else:
            p = spawn_logged(cmd, log, env)
        self.procs.append(p)
        return p

    def stop(self, grace_s: float = 30.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def _on_signal(self, signum, _frame) -> None:
        print(f"[launch] got signal {signum}: stopping the job's steps", flush=True)
        self.stop()
        sys.exit(128 + signum)


def ask_to_stop(output_dir: Path, why: str) -> None:
    """Ask the trainer to checkpoint and stop at the end of its step (``training.lifecycle``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STOP_FILE).write_text(why + "\n")
    print(f"[launch] {why}: asking the trainer to checkpoint and stop ({output_dir / STOP_FILE})", flush=True)


def stopped_since(output_dir: Path, since: float) -> bool:
    """The trainer stopped on request (``stopped.json``) after ``since``: the run is not done."""
    marker = output_dir / STOPPED_FILE
    return marker.is_file() and marker.stat().st_mtime >= since


def requeue(job: SlurmJob, output_dir: Path) -> int:
    """``scontrol requeue`` this job: it starts again and resumes from the stop's checkpoint."""
    step = json.loads((output_dir / STOPPED_FILE).read_text()).get("step")
    print(f"[launch] the trainer stopped at step {step} and saved it: requeueing job {job.job_id}", flush=True)
    r = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:  # the checkpoint is intact: resubmitting the same command resumes
        print(f"[launch] scontrol requeue {job.job_id} failed: {(r.stderr or r.stdout).strip()}", flush=True)
        return 1
    return 0


def launch(plan: LaunchPlan, job: SlurmJob) -> int:
    """Run the job (engines first when they have their own nodes); the training step's status.
    On SIGUSR1 (the time limit nears) the trainer is asked to stop, and the job requeued."""
    logs = plan.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (plan.output_dir / STOP_FILE).unlink(missing_ok=True)  # a request of an earlier allocation
    started = time.time()
    signal.signal(signal.SIGUSR1, lambda *_: ask_to_stop(plan.output_dir, "the job's time limit is near (SIGUSR1)"))
    silent: list[str] = []
    print(
        f"[launch] job {job.job_id}{f' (restart {job.restart_count})' if job.restart_count else ''}: "
        f"{plan.entry} on {len(plan.trainer_hosts)} node(s) x {plan.procs_per_node} process(es), "
        f"master {plan.master_addr}:{plan.master_port}, logs {logs}",
        flush=True,
    )
    if job.restart_count:
        print(f"[launch] requeued: the trainer resumes from {plan.output_dir / 'checkpoints'}", flush=True)
    for note in plan.notes:
        print(f"[launch] note: {note}", flush=True)
    children = _Children()
    try:
        if plan.engines is not None:
            print(f"[launch] starting SGLang on {','.join(plan.engines.hosts)}", flush=True)
            engines = children.start(engines_command(plan))
            wait_for_engines(plan, engines)
        status = plan.status_dir(job)
        shutil.rmtree(status, ignore_errors=True)  # a requeued job keeps its id: drop the last run's
        status.mkdir(parents=True)
        trainer = children.start(trainer_command(plan, job))
        rc, silent = wait_for_step(trainer, status, plan.trainer_hosts)
        print(f"[launch] training step exited with {rc}; logs in {logs}", flush=True)
        if rc == 0 and stopped_since(plan.output_dir, started):
            return requeue(job, plan.output_dir)
        if rc != 0:
            print(
                f"[launch] the job can resume from {plan.output_dir / 'checkpoints'}: requeue it "
                f"(scontrol requeue {job.job_id}) or submit it again",
                flush=True,
            )
        return rc
    finally:
        # srun cannot end the tasks of a node that no longer answers: do not wait long for it
        children.stop(grace_s=10.0 if silent else 30.0)


# -- the engine agent (runs on each engine node under srun) ------------------------------------
def run_engines(config: str, overrides: list[str]) -> int:
    """Start this node's SGLang servers (and the router on the first engine node); exit when
    one of them dies or on SIGTERM, stopping the others."""
    cfg = load_entry_config("rl", config, overrides)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    log_dir = Path(cfg.output_dir) / "logs" / "sglang"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Bind on all interfaces: trainers on other nodes connect to us. The servers join the
    # trainer's weight-update group over the interface that reaches its master.
    sg = cfg.sglang_config(host="0.0.0.0", launch=True, log_dir=str(log_dir))
    master = sg.nccl_master_address or socket.gethostname()
    sockets = choose_socket_ifname(master, cfg.parallel.socket_ifname, {**os.environ, **sg.env})
    sg.env = {**sg.env, **sockets.env}
    print(f"[engines] node {node}: {socket.gethostname()}: gloo/NCCL sockets on {sockets.reason}", flush=True)

    per_node = sg.replicas // max(sg.nodes, 1)
    children = _Children()
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    if node == 0:
        path = log_dir / f"router-{socket.gethostname()}.log"
        procs["router"] = (children.start(router_command(sg), path, sg.env), path)
    for i in range(per_node):
        path = log_dir / f"server-{socket.gethostname()}-{i}.log"
        procs[f"server {i}"] = (children.start(server_command(sg, i), path, server_environment(sg)), path)
    print(f"[engines] node {node}: started {', '.join(procs)}", flush=True)
    try:
        while True:
            for name, (p, path) in procs.items():
                if p.poll() is not None:
                    print(f"[engines] {name} exited with {p.returncode}; log: {path}", flush=True)
                    return 1
            time.sleep(2.0)
    finally:
        children.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entry", choices=sorted(ENTRIES) + ["engines"], help="trainer, or the engine agent")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides passed to the trainer")
    a = p.parse_intermixed_args(argv)  # the entry, then --config, then the overrides
    try:
        if a.entry == "engines":
            return run_engines(a.config, a.overrides)
        job = SlurmJob.from_env()
        plan = plan_launch(a.entry, a.config, a.overrides, job)
        return launch(plan, job)
    except (LaunchError, ConfigError) as e:
        print(f"launch error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
