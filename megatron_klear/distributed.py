"""Process groups from torchrun or Slurm environments, device choice, parallel validation."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_klear.compat import install_cpu_compat
from megatron_klear.errors import ConfigError


@dataclass
class ParallelConfig:
    """The ``parallel`` section: model-parallel layout. Data parallel is what is left of the world."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False  # Transformer Engine only; needs tp > 1
    context_parallel: int = 1  # Transformer Engine only; splits every packed sequence over cp ranks
    # How long a collective may wait for a peer before the job fails. It must cover the longest
    # time one rank works alone while the others wait (a checkpoint save, rank 0's HF export;
    # in RL, rank 0's evaluation: see RLParallelConfig).
    timeout_minutes: int = 30

    def validate(self, where: str = "parallel") -> None:
        for name in ("tp", "pp", "context_parallel", "timeout_minutes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{where}.sequence_parallel needs {where}.tp > 1")

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size in a world of ``world_size`` ranks; errors name the sizes."""
        self.validate()
        mp = self.tp * self.pp * self.context_parallel
        if world_size % mp != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by tp x pp x cp = "
                f"{self.tp} x {self.pp} x {self.context_parallel} = {mp}"
            )
        return world_size // mp


@dataclass
class DistEnv:
    """Where this process sits in the job, read from torchrun or Slurm variables."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also srun + torchrun)
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        return cls(0, 1, 0)


def free_port(start: Optional[int] = None, host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now: any (the OS picks), or with ``start``
    the first one from ``start`` upward (the Slurm launcher's job-derived port)."""
    candidates = [0] if start is None else range(start, start + 2000)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError(f"no free port in {start}..{start + 1999} on {host!r}")


def device() -> torch.device:
    """The device this rank computes on: its local GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig, *, seed: int = 1234) -> DistEnv:
    """Initialise torch.distributed and Megatron's model-parallel groups.

    Uses NCCL on GPUs and gloo on CPU (with the CPU compatibility layer). The parallel
    layout is validated before any collective is created; every group gets
    ``parallel.timeout_minutes``.
    """
    env = DistEnv.from_environ()
    parallel.data_parallel_size(env.world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        install_cpu_compat()
        backend = "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.context_parallel,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj):
    """Global rank 0's picklable object, returned on every rank (as is when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main() -> bool:
    """True on global rank 0 (or when not distributed)."""
    return not dist.is_initialized() or dist.get_rank() == 0


# Set by torchrun for its own workers; a process group started here must not inherit them
# (TORCHELASTIC_USE_AGENT_STORE would make the child wait for torchrun's store).
_LAUNCHER_VARS = ("TORCHELASTIC_", "GROUP_", "ROLE_", "LOCAL_WORLD_SIZE", "MASTER_")


# For a child that must not touch a GPU (the HF export beside a trainer that holds GPU 0's memory).
NO_GPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, env: dict) -> None:
    for key in [k for k in os.environ if k.startswith(_LAUNCHER_VARS)]:
        del os.environ[key]
    # Before anything initialises CUDA (torch reads CUDA_VISIBLE_DEVICES at its first CUDA call).
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, env: Optional[dict] = None) -> None:
    """Call ``fn(*args)`` in ``world_size`` fresh processes; raises if any of them fails.

    Fresh processes also for ``world_size == 1``: Megatron's global parallel state must not
    leak into the caller. ``env`` is set in each child before ``fn`` runs (``NO_GPU_ENV``: the
    child sees no GPU).
    """
    child_args = (fn, world_size, free_port(), args, dict(env or {}))
    mp.start_processes(_child, args=child_args, nprocs=world_size, start_method="spawn")
