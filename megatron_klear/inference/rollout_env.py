"""What must hold between the trainer and its SGLang engines before any server starts.

* **Placement.** ``distributed`` mode broadcasts over NCCL from the trainer to engines on GPUs
  of their own: engines on the trainer's first node (``rollout.sglang.nodes: 0``) must start
  above the trainer's GPUs there (``base_gpu_id`` >= the trainer's processes per node). In
  ``colocated`` mode every engine GPU must be one of the trainer's (CUDA IPC is node-local, and
  each rank serializes its own GPU's copy).
* **The rollout Python's torch.** SGLang often runs from a venv of its own
  (``rollout.sglang.python``). Its torch must read what the trainer sends: in ``distributed``
  mode with NCCL both sides must load the same NCCL (the broadcast is one NCCL group); in
  ``colocated`` mode, and with the gloo backend, the same torch release, because the payloads
  are torch's own pickles (CUDA IPC handles, ``rebuild_cuda_tensor``'s argument list, shared
  memory file names), a private format that has changed between releases. ``probe_torch`` asks
  that Python for ``torch.__version__``, ``torch.version.cuda`` and ``torch.cuda.nccl.version()``
  (None on a build without NCCL); a mismatch is one line naming both.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_klear.errors import ConfigError
from megatron_klear.inference.sglang_servers import SGLangConfig, server_env


def torch_facts() -> dict:
    """This Python's torch version, CUDA and NCCL. Runs in the trainer and, as its source
    (``_PROBE``), in the rollout Python, which need not have our package. NCCL's version needs
    no GPU, only a build with NCCL (CPU builds have none)."""
    import torch

    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError):
        nccl = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl}


_PROBE = inspect.getsource(torch_facts) + "\nimport json\nprint(json.dumps(torch_facts()))\n"


@dataclass(frozen=True)
class TorchBuild:
    """One Python's torch: its version, CUDA and NCCL (None on a build without them)."""

    python: str
    torch: str
    cuda: Optional[str]
    nccl: Optional[str]

    @property
    def release(self) -> tuple[int, int]:
        """(major, minor) of torch: 2.14 for "2.14.1+cu130"."""
        major, minor = self.torch.split("+")[0].split(".")[:2]
        return int(major), int(minor)

    def describe(self) -> str:
        return f"torch {self.torch} (NCCL {self.nccl or 'none'})"


def this_build() -> TorchBuild:
    """The trainer's own torch (this process)."""
    return TorchBuild(sys.executable, **torch_facts())


def probe_torch(python: str, env: Optional[dict] = None, where: str = "rollout.sglang.python") -> TorchBuild:
    """``python``'s torch, asked in a subprocess; ConfigError (naming ``where``) when that Python
    does not start or has no torch."""
    try:
        r = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"{where}={python} cannot be run: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{where}={python} cannot import torch: {last}")
    return TorchBuild(python, **json.loads(r.stdout.strip().splitlines()[-1]))


def torch_problem(
    trainer: TorchBuild, rollout: TorchBuild, sg: SGLangConfig, where: str = "rollout.sglang"
) -> Optional[str]:
    """Why the rollout Python's torch cannot read the trainer's weight payloads, or None."""
    theirs = f"{where}.python={rollout.python} has {rollout.describe()}, the trainer {trainer.describe()}"
    if sg.mode == "distributed" and sg.weight_sync_backend == "nccl":
        if trainer.nccl is None or trainer.nccl != rollout.nccl:
            return (
                f"{theirs}: {where}.mode=distributed broadcasts the weights in one NCCL group, so both must load "
                "the same NCCL: install the same torch in both venvs (tools/setup_cluster_envs.sh)"
            )
        return None
    if trainer.release != rollout.release:
        how = "CUDA IPC handles" if sg.mode == "colocated" else "gloo tensors"
        return (
            f"{theirs}: {where}.mode={sg.mode} sends {how} in torch's own pickled format, which differs between "
            "torch releases: install the same torch in both venvs (tools/setup_cluster_envs.sh)"
        )
    return None


def placement_problem(sg: SGLangConfig, trainer_gpus_per_node: int, where: str = "rollout.sglang") -> Optional[str]:
    """Why the engines' GPUs do not fit the trainer's (``trainer_gpus_per_node`` processes on
    each trainer node, GPUs 0 .. N-1), or None. Engine-only nodes (``nodes`` > 0) and CPU
    engines share nothing with the trainer's GPUs."""
    if sg.device != "cuda" or not sg.launch or sg.nodes > 0:
        return None
    first, last = sg.base_gpu_id, sg.base_gpu_id + sg.replicas * sg.tp_size - 1
    if sg.mode == "distributed" and first < trainer_gpus_per_node:
        return (
            f"{where}.mode=distributed with {where}.nodes=0 puts the engines on GPUs {first}..{last} of the trainer's "
            f"first node, whose GPUs 0..{trainer_gpus_per_node - 1} the trainer uses: set {where}.base_gpu_id >= "
            f"{trainer_gpus_per_node}, give the engines nodes of their own ({where}.nodes), or use mode=colocated"
        )
    if sg.mode == "colocated" and last >= trainer_gpus_per_node:
        return (
            f"{where}.mode=colocated puts engines on GPUs {first}..{last}, but the trainer has GPUs "
            f"0..{trainer_gpus_per_node - 1} on that node: colocated engines share the trainer's GPUs (CUDA IPC)"
        )
    return None


def check_rollout_env(sg: SGLangConfig, trainer_gpus_per_node: int) -> Optional[TorchBuild]:
    """Raise ConfigError (one line) when the engines' GPUs or the rollout Python's torch do not
    fit the trainer's (see the module doc); returns the rollout Python's torch, or None when the
    servers run with this interpreter (nothing to compare)."""
    problem = placement_problem(sg, trainer_gpus_per_node)
    if problem:
        raise ConfigError(problem)
    if not sg.python or sg.python == sys.executable:
        return None
    rollout = probe_torch(sg.python, server_env(sg.env))  # the environment the servers get
    problem = torch_problem(this_build(), rollout, sg)
    if problem:
        raise ConfigError(problem)
    return rollout
