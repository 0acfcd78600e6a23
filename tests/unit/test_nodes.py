"""The per-node parts of a multi-node Slurm job, without Slurm: the choice of the gloo/NCCL
socket interface, the node agent that applies it and reports the node's exit, the launcher's
wait for a step whose node went silent, and the one-line explanation of a collective that timed
out or lost its peer (checked against real gloo errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_klear.distributed import ParallelConfig, collective_failure, spawn
from megatron_klear.errors import ConfigError, LaunchError
from megatron_klear.launch.network import SOCKET_VARS, choose_socket_ifname, interface_towards, local_addresses
from megatron_klear.launch.node import exit_file
from megatron_klear.launch.slurm import SlurmJob, engines_command, plan_launch, trainer_command, wait_for_step
from tests.dist_workers import collective_failure_worker
from tests.jobs import ROOT


def test_socket_interface_from_the_config_the_environment_or_the_address():
    assert ("lo", "127.0.0.1") in local_addresses()
    assert interface_towards("127.0.0.1") == ("lo", "127.0.0.1")
    auto = choose_socket_ifname("127.0.0.1")
    assert auto.env == {v: "lo" for v in SOCKET_VARS} and "holds 127.0.0.1" in auto.reason
    # the config names the interface on every node, whatever the environment says
    cfg = choose_socket_ifname("127.0.0.1", "ib0,ib1", {"GLOO_SOCKET_IFNAME": "eth0"})
    assert cfg.env == {v: "ib0,ib1" for v in SOCKET_VARS} and "parallel.socket_ifname" in cfg.reason
    # a site's own variables are kept; only what is missing is chosen by address
    both = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "^docker"}
    assert choose_socket_ifname("127.0.0.1", "", both).env == {}
    part = choose_socket_ifname("127.0.0.1", "", {"NCCL_SOCKET_IFNAME": "ib"})
    assert part.env == {"GLOO_SOCKET_IFNAME": "lo"} and "kept NCCL_SOCKET_IFNAME=ib" in part.reason
    with pytest.raises(LaunchError, match="'no-such-host.invalid' does not resolve"):
        choose_socket_ifname("no-such-host.invalid")
    with pytest.raises(ConfigError, match="parallel.socket_ifname"):
        ParallelConfig(socket_ifname="ib0, ib1").validate()


def test_node_agent_sets_the_interface_and_reports_the_exit(tmp_path):
    probe = "import os, sys; print('seen', *(os.environ[v] for v in sys.argv[1:])); sys.exit(3)"
    env = {k: v for k, v in os.environ.items() if k not in SOCKET_VARS}
    env.update(SLURM_NODEID="1", SLURM_NNODES="2")
    agent = [sys.executable, "-m", "megatron_klear.launch.node", "--master", "127.0.0.1", f"--exit-dir={tmp_path}"]
    probe_cmd = ["--", sys.executable, "-c", probe, *SOCKET_VARS]
    r = subprocess.run(agent + probe_cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "[node 1/2]" in r.stdout and "lo (holds 127.0.0.1" in r.stdout and "seen lo lo" in r.stdout
    assert exit_file(tmp_path, 1).read_text() == "3\n"
    r = subprocess.run(agent + ["--socket-ifname=eth9"] + probe_cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 3 and "seen eth9 eth9" in r.stdout
    bad = agent[:3] + ["--master", "no-such-host.invalid", f"--exit-dir={tmp_path}"]
    r = subprocess.run(bad + ["--", "true"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "does not resolve" in r.stderr and exit_file(tmp_path, 1).read_text() == "2\n"


def test_trainer_step_runs_the_node_agent_and_engines_learn_the_master():
    job = SlurmJob(job_id="4242", hosts=["g1", "g2"], procs_per_node=8)
    plan = plan_launch("sft", "examples/qwen3_8b/sft_32k.yaml", ["parallel.socket_ifname=ib0"], job, this_host="g1")
    cmd = trainer_command(plan, job)
    agent = cmd[cmd.index("megatron_klear.launch.node") - 2 : cmd.index("--")]
    assert agent[0] == sys.executable and "--master=g1" in agent and "--socket-ifname=ib0" in agent
    assert "--procs-per-node=8" in agent
    assert f"--exit-dir={plan.output_dir / 'logs' / 'sft-4242.status'}" in agent
    assert cmd[cmd.index("--") + 1 : cmd.index("--") + 3] == ["bash", "-c"] and "--node-rank=$SLURM_NODEID" in cmd[-1]
    ov = ["rollout.sglang.mode=distributed", "rollout.sglang.nodes=1"]
    rl = plan_launch("rl", "examples/qwen3_8b/rl_math.yaml", ov, SlurmJob("7", ["n1", "n2", "n3"], 8), this_host="n1")
    assert engines_command(rl)[-1] == "rollout.sglang.nccl_master_address=n1"


def test_the_launcher_stops_waiting_for_a_node_that_went_silent(tmp_path):
    hosts = ["a", "b"]
    srun = subprocess.Popen(["sleep", "60"])  # an srun that waits for a dead node forever
    try:
        exit_file(tmp_path, 0).write_text("1\n")  # node a's trainers failed; b says nothing
        t0 = time.time()
        assert wait_for_step(srun, tmp_path, hosts, grace_s=0.5, poll_s=0.1) == (1, ["b"])
        assert time.time() - t0 < 10
    finally:
        srun.kill()
        srun.wait()
    exit_file(tmp_path, 1).write_text("143\n")  # both nodes reported: srun's own status counts
    assert wait_for_step(subprocess.Popen(["sh", "-c", "sleep 1; exit 4"]), tmp_path, hosts, 0.2, 0.1) == (4, [])
    assert wait_for_step(subprocess.Popen(["true"]), tmp_path / "none", hosts) == (0, [])


def test_collective_failures_are_explained_from_real_gloo_errors(tmp_path):
    out = tmp_path / "errors.json"
    spawn(collective_failure_worker, 2, str(out))
    errors = json.loads(out.read_text())
    silent = collective_failure(RuntimeError(errors["silent"]), timeout_minutes=1)
    assert silent.startswith("a collective timed out after 2 s (parallel.timeout_minutes=1): a peer rank stopped")
    assert "requeue" in silent and "Timed out waiting 2000ms" in silent
    gone = collective_failure(RuntimeError(errors["gone"]))
    assert gone is not None and gone.startswith("a peer rank dropped its connection"), errors["gone"]
    assert collective_failure(RuntimeError("CUDA out of memory")) is None
    assert collective_failure(ValueError("Timed out waiting 5ms for recv operation")) is None
