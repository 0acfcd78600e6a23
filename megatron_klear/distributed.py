"""Process groups from torchrun or Slurm environments, device choice, parallel validation,
local worker processes, and helper processes that die with their parent.

A rank that dies (kill -9, a node failure) must not leave its helpers behind: Megatron's
checkpoint writers (forked) and its results-queue manager (spawned) would otherwise be reparented
to PID 1 and live on, holding memory and pipes. ``children_die_with_me`` makes every child this
process forks get SIGKILL when it dies (Linux ``PR_SET_PDEATHSIG``, or a thread watching the
parent's PID where that is not available); ``die_with_parent`` does the same from inside a
spawned child.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from megatron_klear import console
from megatron_klear.compat import install_cpu_compat, install_megatron_compat
from megatron_klear.errors import ConfigError, KlearError, LaunchError


@dataclass
class ParallelConfig:
    """The ``parallel`` section: model-parallel layout. Data parallel is what is left of the world."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    sequence_parallel: bool = False  # Transformer Engine only; needs tp > 1
    context_parallel: int = 1  # Transformer Engine only; splits every packed sequence over cp ranks
    # MoE models: experts split over this many ranks (within the data-parallel x tp x cp ranks
    # of a pipeline stage; the world size must be a multiple of etp x ep x pp)
    expert_parallel: int = 1
    # MoE models: each expert's weights split over this many ranks (1: whole experts, the usual
    # choice for fine-grained experts such as Qwen3-30B-A3B's)
    expert_tensor_parallel: int = 1
    # How long a collective may wait for a peer before the job fails. It must cover the longest
    # time one rank works alone while the others wait (a checkpoint save, rank 0's HF export;
    # in RL, rank 0's evaluation: see RLParallelConfig).
    timeout_minutes: int = 30
    # Network interface(s) of the gloo/NCCL sockets on every node (GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME, set by the Slurm launcher); empty: the environment's, else the
    # interface holding the node's address towards the rendezvous host (launch/network.py).
    socket_ifname: str = ""

    def validate(self, where: str = "parallel") -> None:
        for name in ("tp", "pp", "context_parallel", "expert_parallel", "expert_tensor_parallel", "timeout_minutes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{where}.sequence_parallel needs {where}.tp > 1")
        if any(c.isspace() for c in self.socket_ifname):
            raise ConfigError(f"{where}.socket_ifname is a comma-separated list of names, got {self.socket_ifname!r}")

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size in a world of ``world_size`` ranks; errors name the sizes."""
        self.validate()
        mp = self.tp * self.pp * self.context_parallel
        if world_size % mp != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by tp x pp x cp = "
                f"{self.tp} x {self.pp} x {self.context_parallel} = {mp}"
            )
        expert = self.expert_tensor_parallel * self.expert_parallel * self.pp
        if world_size % expert != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.expert_tensor_parallel x "
                f"parallel.expert_parallel x parallel.pp = {self.expert_tensor_parallel} x {self.expert_parallel} x "
                f"{self.pp} = {expert}"
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
    raise LaunchError(f"no free port in {start}..{start + 1999} on {host!r}")


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
    install_megatron_compat()
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
    children_die_with_me()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.context_parallel,
            expert_model_parallel_size=parallel.expert_parallel,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group."""
    global _wait_group
    _wait_group = None
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# What torch's gloo transport (and NCCL's watchdog) say when a peer of a collective goes silent
# or away (torch 2.13): "Timed out waiting 60000ms for recv operation to complete", "Connection
# closed by peer [10.1.2.3]:4567", "Connection reset by peer".
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms for \w+ operation|Watchdog caught collective operation timeout")
_PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")


def collective_failure(exc: BaseException, timeout_minutes: Optional[int] = None) -> Optional[str]:
    """One line saying what happened when ``exc`` is a collective that timed out or lost a peer
    (a node died, the network to it was cut, a rank hung or crashed); None for anything else."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    resume = "the checkpoints are intact: requeue or resubmit the job to resume from the latest one"
    m = _TIMED_OUT.search(text)
    if m:
        waited = f"{int(m.group(1)) / 1000:.0f} s" if m.group(1) else "its timeout"
        setting = f" (parallel.timeout_minutes={timeout_minutes})" if timeout_minutes else ""
        return (
            f"a collective timed out after {waited}{setting}: a peer rank stopped answering (its node died, "
            f"the network to it is cut, or it hangs); {resume} [{first}]"
        )
    if _PEER_GONE.search(text):
        return (
            "a peer rank dropped its connection in the middle of a collective (it or its node died: its own "
            f"log says why); {resume} [{first}]"
        )
    return None


def broadcast_object(obj):
    """Global rank 0's picklable object, returned on every rank (as is when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Waiting for rank 0 can take longer than the collective timeout (a token cache of a large data
# set takes most of an hour): the wait goes through a gloo group of its own with a long timeout.
_WAIT_TIMEOUT = datetime.timedelta(days=2)
_wait_group = None


def rank0_first(fn: Callable[[], Any], what: str) -> Any:
    """Collective: rank 0 runs ``fn()`` first, then every other rank does (rank 0 builds a cache
    that the others then read). The others wait however long rank 0 takes (not bounded by the
    collective timeout); an error on rank 0 is raised on every rank, a ``KlearError`` as is."""
    global _wait_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)
    box: list = [None]
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            box[0] = e if isinstance(e, KlearError) else RuntimeError(f"rank 0 failed while {what}: {e!r}")
            dist.broadcast_object_list(box, src=0, group=_wait_group)
            raise
        dist.broadcast_object_list(box, src=0, group=_wait_group)
        return result
    print(f"waiting for rank 0: {what}", flush=True)
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    if box[0] is not None:
        raise box[0]
    return fn()


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


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    parent: int,
    errors,
    args: tuple,
    env: dict,
    stamp: Optional[int] = None,
) -> None:
    die_with_parent(parent)
    if stamp is not None:  # the parent's console stamp (time and its rank) on this helper's lines too
        console.install(stamp)
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
    try:
        fn(*args)
    except (KlearError, OSError) as e:  # the user's (or the disk's) error: the parent raises it as is
        errors.put(e)
        raise SystemExit(2) from None


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, env: Optional[dict] = None) -> None:
    """Call ``fn(*args)`` in ``world_size`` fresh processes; raises if any of them fails.

    A ``KlearError`` (or ``OSError``) in a worker is raised here as the same error (the tools
    print it as one line); anything else keeps the worker's traceback. The workers die with this process.
    Fresh processes also for ``world_size == 1``: Megatron's global parallel state must not
    leak into the caller. ``env`` is set in each child before ``fn`` runs (``NO_GPU_ENV``: the
    child sees no GPU).
    """
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _child,
            args=(fn, world_size, free_port(), os.getpid(), errors, args, dict(env or {}), console.installed_rank()),
            nprocs=world_size,
            start_method="spawn",
        )
    except ProcessException:
        if not errors.empty():
            raise errors.get() from None
        raise


# --- helper processes die with their parent ------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_hooked = False
_fork_state = {"from_main_thread": True, "parent": 0}


def _watch_parent(parent: int) -> None:
    """Exit as soon as ``parent`` is no longer this process's parent (it died: we were reparented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def die_with_parent(parent: Optional[int] = None) -> None:
    """This process gets SIGKILL when ``parent`` (default: its parent now) dies.

    Linux ``PR_SET_PDEATHSIG`` (the kernel's signal fires even when the parent is killed -9);
    elsewhere a daemon thread watches the parent's PID. Exits at once if the parent is already
    gone (it died before the signal was armed).
    """
    parent = parent or os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        _watch_parent(parent)


def _before_fork() -> None:
    _fork_state.update(from_main_thread=threading.current_thread() is threading.main_thread(), parent=os.getpid())


def _after_fork_in_child() -> None:
    # PDEATHSIG fires when the *thread* that forked exits; only the main thread lives as long as
    # the process, so a child forked from another thread watches the parent's PID instead.
    if _fork_state["from_main_thread"]:
        die_with_parent(_fork_state["parent"])
    else:
        _watch_parent(_fork_state["parent"])


def children_die_with_me() -> None:
    """Every child this process forks from now on dies with it (idempotent).

    Covers ``multiprocessing`` fork children (Megatron's checkpoint writers); programs started
    with ``subprocess`` or the spawn method do not run fork hooks (see ``die_with_parent``).
    """
    global _hooked
    if not _hooked:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hooked = True
