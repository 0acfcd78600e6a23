"""slurm/*.sbatch on a real Slurm of two compute nodes, each a network namespace with its own
address, hostname and slurmd (``tools/local_slurm.sh start --nodes 2``): ranks talk gloo over
real kernel networking between the namespaces, and a node can really die.

* SFT with data parallelism across the nodes and TP=2 inside each is bit-identical (losses,
  final weights) to the same layout on one node;
* RL with the trainer on node 1 and the real SGLang server and router on node 2 (distributed
  sync over gloo across the namespaces), the probe passing after every sync;
* ``scontrol requeue`` mid-run: the job resumes and ends bit-identical to the reference;
* a node dies mid-step (link cut, slurmd and its processes killed): the survivors fail with the
  collective timeout's message, the launcher ends the job instead of waiting for Slurm to declare
  the node down, and after requeue the job resumes from the last checkpoint;
* ``stop`` leaves no namespace, interface, hosts entry or daemon behind.

``bash tools/test.sh`` starts the cluster once (``KLEAR_SLURM_2N_DIR``) and stops it after the
suite; run alone, the module starts its own and stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_slurm import TERMINAL, TINY_MODEL, _logged_past_a_save, _tail, job_state, steps_and_losses
from tests.jobs import ROOT
from tests.sglang_real import server_env, sglang_python

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(1200)]

SCRIPT = str(ROOT / "tools" / "local_slurm.sh")
STEPS, SAVE = 60, 20  # saves at 20 and 40: a requeue or a dead node lands a few steps past one
TIMEOUT_MIN = 1  # parallel.timeout_minutes of every run (the smallest the config takes)


@dataclass
class Cluster:
    env: dict  # for sbatch, scontrol and tools/local_slurm.sh (KLEAR_SLURM_DIR, SLURM_CONF)
    nodes: list  # node names, in order


def local_slurm(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


def start_cluster(slurm_dir: str) -> Cluster:
    """Start (or find running) the two-node cluster in ``slurm_dir``; skips saying why it cannot."""
    env = dict(os.environ, KLEAR_SLURM_DIR=slurm_dir)
    env.pop("MEGATRON_KLEAR_CRASH_AT", None)
    r = local_slurm(env, "start", "--nodes", "2")
    if r.returncode != 0:
        pytest.skip(f"could not start a 2-node local Slurm: {(r.stderr or r.stdout).strip()[-500:]}")
    env["SLURM_CONF"] = local_slurm(env, "env").stdout.strip().split("=", 1)[1]
    nodes = local_slurm(env, "nodes").stdout.split()
    assert len(nodes) == 2, nodes
    return Cluster(env, nodes)


@pytest.fixture(scope="module")
def cluster():
    slurm_dir = os.environ.get("KLEAR_SLURM_2N_DIR")
    own = not slurm_dir
    if own:  # one per checkout: sessions on other checkouts run their own
        slurm_dir = f"/tmp/klear-slurm-2n-{hashlib.md5(str(ROOT).encode()).hexdigest()[:8]}"
    c = start_cluster(slurm_dir)
    yield c
    if own:
        r = local_slurm(c.env, "stop")
        assert r.returncode == 0, r.stderr


def sbatch(c: Cluster, script: str, args: list[str], out: Path, nodes: int, procs: int) -> str:
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={out}"]
    cmd += [f"--export=ALL,KLEAR_PROCS_PER_NODE={procs}", script, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=c.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def slurm(c: Cluster, *cmd: str) -> str:
    return subprocess.run(list(cmd), env=c.env, capture_output=True, text=True, timeout=60, check=True).stdout


def state(c: Cluster, job: str) -> tuple[str, str, int]:
    """(JobState, ExitCode, Restarts)."""
    text = slurm(c, "scontrol", "-o", "show", "job", job)
    st, code = job_state(c.env, job)
    return st, code, int(re.search(r"Restarts=(\d+)", text).group(1))


def wait_for(what: str, check, timeout: float, log: Path, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s; job output:\n{_tail(log)}")


def wait_done(c: Cluster, job: str, log: Path, timeout: float = 600) -> tuple[str, str, int]:
    """The job's (state, exit code, restarts) once it has ended."""

    def ended():
        st = state(c, job)
        return st if st[0] in TERMINAL else None

    return wait_for(f"job {job} ends", ended, timeout, log)


def sft_args(base: Path, out: Path) -> list[str]:
    return [
        "examples/tiny/sft.yaml",
        f"output_dir={out}",
        f"model.hf={base / 'model'}",
        f"model.create_tiny={TINY_MODEL}",
        f"data.generate={base / 'data'}",
        f"data.train=[{base / 'data' / 'sft.jsonl'}]",
        f"data.cache_dir={base / 'cache'}",
        f"train_steps={STEPS}",
        f"checkpoint.save_interval={SAVE}",
        "parallel.tp=2",
        f"parallel.timeout_minutes={TIMEOUT_MIN}",
        "log.interval=1",
        "log.tensorboard=false",
    ]


def run_sft(c: Cluster, base: Path, name: str, nodes: int, procs: int) -> tuple[Path, str]:
    out, log = base / name, base / f"{name}.out"
    job = sbatch(c, "slurm/sft.sbatch", sft_args(base, out), log, nodes, procs)
    assert wait_done(c, job, log)[:2] == ("COMPLETED", "0:0"), _tail(log) + _tail(out / "logs" / f"sft-{job}-node0.log")
    return out, job


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def reference(cluster, base) -> Path:
    """TP=2 x DP=2 on ONE node (4 processes): what every two-node SFT run must reproduce."""
    return run_sft(cluster, base, "one_node", nodes=1, procs=4)[0]


@pytest.fixture(scope="module")
def two_nodes(cluster, base, reference) -> tuple[Path, str]:
    return run_sft(cluster, base, "two_nodes", nodes=2, procs=2)


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical: every step's loss and grad norm, and every exported weight."""
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    refs = {r["step"]: r for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(refs) == list(range(1, STEPS + 1))
    for step, r in refs.items():
        assert (rows[step]["loss"], rows[step]["grad_norm"]) == (r["loss"], r["grad_norm"]), step
    ours, theirs = load_file(run / "hf" / "model.safetensors"), load_file(ref / "hf" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sft_across_two_nodes_is_bit_identical_to_one_node(cluster, reference, two_nodes):
    run, job = two_nodes
    assert_same_run(run, reference)
    n1, n2 = cluster.nodes
    node0 = (run / "logs" / f"sft-{job}-node0.log").read_text()
    node1 = (run / "logs" / f"sft-{job}-node1.log").read_text()
    # each node's agent: its hostname, the global ranks it holds, the interface chosen by address
    assert re.search(rf"\[node 0/2\] {n1} \(10\.213\.\d+\.11\): ranks 0-1 of 4; gloo/NCCL sockets on klnet0", node0)
    assert re.search(rf"\[node 1/2\] {n2} \(10\.213\.\d+\.12\): ranks 2-3 of 4; gloo/NCCL sockets on klnet0", node1)
    assert f"this node's address towards {n1}" in node1
    assert f"sft on 2 node(s) x 2 process(es), master {n1}:" in (run.parent / "two_nodes.out").read_text()


def test_rl_with_the_sglang_engine_on_its_own_node(cluster, two_nodes, tmp_path):
    """Trainer on node 1; SGLang server + router on node 2; weights over a gloo group that
    spans the namespaces; the probe (engine vs trainer log-probs) checked after every sync."""
    sft, _ = two_nodes
    n1, n2 = cluster.nodes
    out, log = tmp_path / "rl", tmp_path / "rl.out"
    data = sft.parent / "data"
    args = [
        "examples/tiny/rl_math.yaml",
        f"output_dir={out}",
        f"model.hf={sft / 'hf'}",
        "bootstrap=null",
        f"data.generate={data}",
        f"data.train=[{data / 'math_train.parquet'}]",
        f"data.eval=[{data / 'math_test.parquet'}]",
        "train_steps=2",
        "data.prompts_per_step=4",
        "data.mini_batch_prompts=2",
        "data.max_gen_batches=1",
        "rollout.n_samples=4",
        "rollout.max_response_len=32",
        "rollout.max_logprob_diff=1e-3",  # a sync the engine did not take fails the step
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.export_hf=false",
        "rollout.engine=sglang",
        "rollout.sglang.mode=distributed",
        "rollout.sglang.nodes=1",  # the last node of the allocation runs only engines
        "rollout.sglang.weight_sync_backend=gloo",
        "rollout.sglang.device=cpu",
        "rollout.sglang.dtype=float32",
        f"rollout.sglang.python={sglang_python()}",
        f"rollout.sglang.env={json.dumps(server_env())}",
        f"rollout.sglang.extra_args={json.dumps(['--skip-server-warmup', '--max-total-tokens', '4096'])}",
        "rollout.sglang.startup_timeout_s=300",
    ]  # default ports: every node has its own network namespace, so they are free there
    job = sbatch(cluster, "slurm/rl.sbatch", args, log, nodes=2, procs=1)
    st = wait_done(cluster, job, log, timeout=900)
    trainer_log = out / "logs" / f"rl-{job}-node0.log"
    assert st[:2] == ("COMPLETED", "0:0"), _tail(log) + _tail(trainer_log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows if "reward/mean" in r)
    text = trainer_log.read_text()
    assert re.search(rf"\[node 0/1\] {n1} \(\S+\): rank 0 of 1; gloo/NCCL sockets on klnet0", text)
    assert "initial sync: " in text and f"at {n1}:" in text  # the weight-update group meets on node 1
    assert f"[launch] starting SGLang on {n2}" in log.read_text()
    engines = (out / "logs" / f"engines-{job}-{n2}.log").read_text()
    assert f"[engines] node 0: {n2}: gloo/NCCL sockets on klnet0" in engines
    server = (out / "logs" / "sglang" / f"server-{n2}-0.log").read_text()
    assert (out / "logs" / "sglang" / f"router-{n2}.log").is_file()
    assert server.count("/update_weights_from_distributed") >= 3  # the initial sync and one per step
    assert "/init_weights_update_group" in server


def past_a_save(c: Cluster, job: str, run: Path, log: Path) -> None:
    """Wait until the running job logged a few steps past a checkpoint (not the last one)."""

    def ready():
        st = state(c, job)[0]
        assert st not in TERMINAL, f"job {job} ended ({st}) before the test could interrupt it:\n{_tail(log)}"
        return _logged_past_a_save(run, first_save=SAVE, interval=SAVE) and max(steps_and_losses(run)) < STEPS - SAVE

    wait_for(f"job {job} past a save", ready, 600, log, poll=0.1)


def test_requeued_two_node_job_resumes_bit_exactly(cluster, base, reference):
    out, log = base / "requeued", base / "requeued.out"
    job = sbatch(cluster, "slurm/sft.sbatch", sft_args(base, out), log, nodes=2, procs=2)
    past_a_save(cluster, job, out, log)
    slurm(cluster, "scontrol", "requeue", job)
    first = steps_and_losses(out)
    assert wait_done(cluster, job, log)[:3] == ("COMPLETED", "0:0", 1), _tail(log)
    saved = int((out / "logs" / f"sft-{job}-node0.log").read_text().split("resumed from ")[1].split("iter_")[1][:7])
    assert saved in (SAVE, 2 * SAVE) and saved < max(first), "the requeue came too late to test a resume"
    assert f"[launch] job {job} (restart 1): sft on 2 node(s)" in log.read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # re-run steps replaced
    assert all(first[r["step"]] == r["loss"] for r in rows if saved < r["step"] <= max(first))  # redone: equal
    assert_same_run(out, reference)


def test_a_node_dies_mid_step_then_the_requeued_job_resumes(cluster, base, reference):
    n1, n2 = cluster.nodes
    out, log = base / "node_dies", base / "node_dies.out"
    job = sbatch(cluster, "slurm/sft.sbatch", sft_args(base, out), log, nodes=2, procs=2)
    past_a_save(cluster, job, out, log)
    killed = time.time()
    r = local_slurm(cluster.env, "kill-node", n2)  # link down first: the survivors see silence, not a reset
    assert r.returncode == 0, r.stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    # node 1's ranks wait in a collective until the timeout, fail with a clear message; the
    # launcher gives srun 30 s to end the step, then stops it and the job ends on its own
    wait_for("the launcher ends the step", lambda: "training step exited with" in log.read_text(), 400, log)
    ended = time.time()
    node0 = (out / "logs" / f"sft-{job}-node0.log").read_text()
    m = re.search(r"^(\S+ \S+) \[rank \d\] error: a collective timed out after (\d+) s \(parallel.timeout_minutes=1\): "
                  r"a peer rank stopped answering", node0, re.M)  # fmt: skip
    assert m, node0[-3000:]
    assert int(m.group(2)) == 60 * TIMEOUT_MIN
    failed_after = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() - killed
    assert failed_after < 60 * TIMEOUT_MIN + 30, failed_after  # within the timeout (+ the step it was in)
    text = log.read_text()
    assert f"[launch] node 0 ({n1}) failed with exit 1" in text
    assert f"[launch] no exit status from {n2} 30 s after node 0 ({n1}) failed: that node died" in text
    assert ended - killed < 240, "the job should end long before Slurm declares the node down (SlurmdTimeout=300)"
    wait_for("the batch script ends", lambda: state(cluster, job)[0] != "RUNNING", 120, log)
    assert state(cluster, job)[2] == 0  # ended by us, not requeued by Slurm's node-failure path
    r = local_slurm(cluster.env, "revive-node", n2)
    assert r.returncode == 0, r.stderr
    assert wait_done(cluster, job, log)[:2] == ("FAILED", "1:0")
    slurm(cluster, "scontrol", "requeue", job)
    wait_for(f"job {job} requeued", lambda: state(cluster, job)[0] not in TERMINAL, 60, log)
    assert wait_done(cluster, job, log)[:3] == ("COMPLETED", "0:0", 1), _tail(log)
    node0 = (out / "logs" / f"sft-{job}-node0.log").read_text()
    assert f"resumed from {out / 'checkpoints' / latest}" in node0
    assert_same_run(out, reference)


def test_stop_leaves_no_namespace_interface_hosts_entry_or_daemon(cluster):
    """A second cluster (its own directory, names, subnet and ports, beside the first) with a
    job running on both nodes; ``stop`` removes all of it and leaves the rest as it was."""
    before = (_links(), _namespaces(), Path("/etc/hosts").read_text())
    slurm_dir = tempfile.mkdtemp(prefix="klear-slurm-stop-", dir="/tmp")  # munge: every parent searchable
    try:
        c = start_cluster(slurm_dir)
        assert not set(c.nodes) & set(cluster.nodes) and c.env["SLURM_CONF"] != cluster.env["SLURM_CONF"]
        out = Path(slurm_dir) / "job.out"
        job = slurm(c, "sbatch", "--parsable", "--nodes=2", f"--output={out}", "--wrap", "srun sleep 300").strip()
        wait_for("the job's srun step", lambda: f"{job}.0" in slurm(c, "squeue", "-h", "-s", "-j", job), 120, out)
        tag = hashlib.md5(slurm_dir.encode()).hexdigest()[:4]
        assert f"klear-local-slurm {tag}" in Path("/etc/hosts").read_text()
        assert {f"klear-{tag}-n1", f"klear-{tag}-n2"} <= set(_namespaces().split())
        pids = [int(Path(f).read_text()) for f in Path(slurm_dir).glob("**/*.pid")]  # munged, slurmctld, slurmds
        for ns in (f"klear-{tag}-n1", f"klear-{tag}-n2"):  # slurmd, slurmstepd, sleep
            pids += map(int, subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split())
        assert len(pids) >= 8, pids
        r = local_slurm(c.env, "stop")
        assert r.returncode == 0, r.stderr
        assert "stopped 2 namespaced node(s)" in r.stderr
    finally:
        local_slurm(dict(os.environ, KLEAR_SLURM_DIR=slurm_dir), "stop")
        shutil.rmtree(slurm_dir, ignore_errors=True)
    assert (_links(), _namespaces(), Path("/etc/hosts").read_text()) == before
    assert not [p for p in pids if _running(p)], "processes of the stopped cluster still run"


def _links() -> set[str]:
    """Every network interface of this namespace, by name."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended: this machine's PID 1 may reap it late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
