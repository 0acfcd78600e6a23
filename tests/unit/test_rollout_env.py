"""Engine placement against the trainer's GPUs, the CUDA IPC payload's device named by UUID, and
the torch comparison rules (the probe of a real second Python: tests/e2e/test_rollout_env.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_klear.errors import ConfigError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.rollout_env import TorchBuild, check_rollout_env, placement_problem, torch_problem
from megatron_klear.inference.sglang_servers import SGLangConfig
from megatron_klear.sync import ipc


def test_distributed_engines_never_share_the_trainers_gpus():
    for sg in [SGLangConfig(mode="distributed"), SGLangConfig(mode="distributed", base_gpu_id=4, replicas=2)]:
        with pytest.raises(ConfigError) as e:
            check_rollout_env(sg, trainer_gpus_per_node=8)
        msg = str(e.value)
        assert "rollout.sglang.base_gpu_id >= 8" in msg and "whose GPUs 0..7 the trainer uses" in msg, msg
    assert placement_problem(SGLangConfig(mode="distributed", base_gpu_id=4, tp_size=4), 4) is None
    assert placement_problem(SGLangConfig(mode="distributed", nodes=2), 8) is None  # engine-only nodes
    assert placement_problem(SGLangConfig(mode="distributed", device="cpu"), 8) is None
    # colocated engines are on the trainer's GPUs, all of them
    assert placement_problem(SGLangConfig(mode="colocated", replicas=2, tp_size=4), 8) is None
    msg = placement_problem(SGLangConfig(mode="colocated", replicas=2, tp_size=4), 4)
    assert "puts engines on GPUs 0..7, but the trainer has GPUs 0..3" in msg
    # the static case is refused as an RL config loads (RolloutConfig.validate), before anything
    # knows the GPU count; an evaluation has no trainer, so SGLangConfig.validate alone accepts it
    with pytest.raises(ConfigError, match="base_gpu_id"):
        SGLangConfig(mode="distributed").check_apart_from_trainer()
    SGLangConfig(mode="distributed", base_gpu_id=8).check_apart_from_trainer()
    SGLangConfig(mode="distributed").validate()


def test_cuda_ipc_handles_name_the_gpu_by_uuid():
    """The device argument of torch's rebuild_cuda_tensor becomes the GPU's UUID (SGLang's
    senders' form), and a payload still loads (here: CPU shared memory, the path the CPU tests
    take; the CUDA path runs in tests/gpu and tools/check_cuda_ipc_payload.py)."""
    args = tuple(range(15))
    named = ipc.device_uuid_args(args, lambda i: f"GPU-uuid-{i}")
    assert named[ipc.CUDA_DEVICE_ARG] == "GPU-uuid-6" and named[:6] == args[:6] and named[7:] == args[7:]
    assert ipc.device_uuid_args(named, lambda i: "never") == named  # already a UUID
    ipc.share_cpu_tensors()
    flat, meta = api.flatten_bucket(api.bucket_order([("w", torch.arange(6.0).reshape(2, 3))]))
    sent: list = []
    obj = ipc.load_payload(ipc.serialize_payload(flat, meta), sent)
    assert torch.equal(obj["flattened_tensor"], flat) and sent == []  # no CUDA handle on a CPU


def _build(torch_version: str, nccl) -> TorchBuild:
    return TorchBuild("/venv/bin/python", torch_version, "13.0" if nccl else None, nccl)


def test_torch_rules_per_weight_sync_mode():
    a, b = _build("2.9.1+cu130", "2.27.7"), _build("2.14.1+cu130", "2.30.7")
    nccl = SGLangConfig(mode="distributed", nodes=1)
    msg = torch_problem(a, b, nccl)
    assert "has torch 2.14.1+cu130 (NCCL 2.30.7), the trainer torch 2.9.1+cu130 (NCCL 2.27.7)" in msg
    assert "same NCCL" in msg and "\n" not in msg
    assert torch_problem(b, _build("2.14.0+cu130", "2.30.7"), nccl) is None  # the same NCCL is enough
    assert "NCCL none" in torch_problem(_build("2.13.0+cpu", None), _build("2.13.0+cpu", None), nccl)
    colocated = SGLangConfig(mode="colocated")
    assert "CUDA IPC handles in torch's own pickled format" in torch_problem(a, b, colocated)
    assert torch_problem(b, _build("2.14.0+cu130", "2.30.5"), colocated) is None  # same release
    gloo = SGLangConfig(mode="distributed", nodes=1, weight_sync_backend="gloo")
    assert "gloo tensors" in torch_problem(a, b, gloo)
