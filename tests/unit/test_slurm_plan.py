"""The Slurm launcher's plan (hosts, ranks, engine nodes, ports), without a Slurm job."""

from __future__ import annotations

import socket

import pytest

from megatron_klear.distributed import free_port
from megatron_klear.errors import ConfigError, LaunchError
from megatron_klear.launch.slurm import SlurmJob, plan_launch, trainer_command


def test_plan_uses_every_node_and_the_first_as_master():
    plan = plan_launch("sft", "examples/qwen3_8b/sft_32k.yaml", [], _job(["g1", "g2", "g3", "g4"]), this_host="g1")
    assert plan.trainer_hosts == ["g1", "g2", "g3", "g4"] and plan.master_addr == "g1" and plan.engines is None
    cmd = trainer_command(plan, _job(["g1"]))
    assert cmd[0] == "srun" and "--nodelist=g1,g2,g3,g4" in cmd and "--ntasks-per-node=1" in cmd
    assert "--node-rank=$SLURM_NODEID" in cmd[-1] and "--nproc-per-node=8" in cmd[-1]


def test_plan_rejects_node_counts_and_batches_that_do_not_fit():
    with pytest.raises(LaunchError, match="not a multiple of parallel.tp x parallel.pp"):
        plan_launch("sft", "examples/tiny/sft.yaml", ["parallel.tp=2", "parallel.pp=2"], _job(["a"], procs=2))
    with pytest.raises(LaunchError, match="data-parallel size 16"):
        # 8 sequences per global batch cannot be split over 16 data-parallel ranks
        plan_launch("sft", "examples/tiny/sft.yaml", [], _job(["a", "b"], procs=8))
    with pytest.raises(ConfigError, match="does not exist"):
        plan_launch("sft", "examples/tiny/missing.yaml", [], _job(["a"]))
    with pytest.raises(LaunchError, match="unknown entry"):
        plan_launch("dpo", "examples/tiny/sft.yaml", [], _job(["a"]))


def test_plan_puts_engines_on_their_own_nodes_in_distributed_mode():
    ov = ["rollout.sglang.mode=distributed", "rollout.sglang.nodes=2", "rollout.sglang.replicas=4"]
    ov += ["rollout.sglang.tp_size=4", "rollout.sglang.launch=true"]
    plan = plan_launch("rl", "examples/qwen3_8b/rl_math.yaml", ov, _job(["n1", "n2", "n3", "n4"]), this_host="n1")
    assert plan.trainer_hosts == ["n1", "n2"] and plan.engines.hosts == ["n3", "n4"]
    assert plan.engines.server_urls == ["http://n3:30000", "http://n3:30001", "http://n4:30000", "http://n4:30001"]
    assert plan.engines.router_url == "http://n3:30080"
    extra = plan.trainer_overrides[len(ov) :]
    assert "rollout.sglang.launch=false" in extra and "rollout.sglang.nccl_master_address=n1" in extra
    with pytest.raises(LaunchError, match="leaves no trainer node"):
        plan_launch("rl", "examples/qwen3_8b/rl_math.yaml", ov, _job(["n1", "n2"]))
    with pytest.raises(LaunchError, match="needs rollout.sglang.mode=distributed"):
        plan_launch("rl", "examples/qwen3_8b/rl_math.yaml", ["rollout.sglang.nodes=1"], _job(["n1", "n2"]))


def test_port_in_use_is_skipped():
    taken = free_port(25000)  # the launcher's base port for job id taken - 20000
    with socket.socket() as s:
        s.bind(("", taken))
        s.listen()
        assert free_port(taken) != taken
        job = _job(["me"], procs=1, job_id=str(taken - 20000))
        plan = plan_launch("sft", "examples/tiny/sft.yaml", [], job, this_host="me")
        assert plan.master_port > taken


# -- planning, without Slurm ---------------------------------------------------------------------
def _job(hosts: list[str], procs: int = 8, job_id: str = "4242") -> SlurmJob:
    return SlurmJob(job_id=job_id, hosts=hosts, procs_per_node=procs)
