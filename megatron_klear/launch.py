"""Run a function on N local processes with torch.distributed environment variables set.

Used by the conversion tools (so users need no torchrun for offline work) and by tests.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_klear.distributed import free_port

# Set by torchrun for its own workers; a process group started here must not inherit them
# (TORCHELASTIC_USE_AGENT_STORE would make the child wait for torchrun's store).
_LAUNCHER_VARS = ("TORCHELASTIC_", "GROUP_", "ROLE_", "LOCAL_WORLD_SIZE", "MASTER_")


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    for key in [k for k in os.environ if k.startswith(_LAUNCHER_VARS)]:
        del os.environ[key]
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(*args)`` in ``world_size`` fresh processes; raises if any of them fails.

    Fresh processes also for ``world_size == 1``: Megatron's global parallel state must not
    leak into the caller.
    """
    mp.start_processes(_child, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="spawn")
