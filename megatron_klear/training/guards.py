"""Guards of a training run: fault injection for tests, and stops on non-finite numbers.

A non-finite loss, gradient or weight stops the run before any checkpoint or weight sync sees
the poisoned state, with ``nan_diagnostics.json`` saying what was seen.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_klear.checkpoint.megatron_ckpt import rank
from megatron_klear.distributed import comm_device


def maybe_crash(point: str, step: int) -> None:
    """Fault injection for tests: ``MEGATRON_KLEAR_CRASH_AT=save:12`` (or ``step:12``) kills the
    process at that point with SIGKILL (kill -9: no cleanup at all), as a node failure would."""
    if os.environ.get("MEGATRON_KLEAR_CRASH_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def stop_on_nonfinite(out: Path, step: int, **info) -> None:
    """Write ``nan_diagnostics.json`` and raise, before any checkpoint or weight sync sees the
    poisoned weights."""
    if rank() == 0:
        diag = dict(step=step, **info, note="non-finite loss or gradient; nothing was saved or synced")
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "nan_diagnostics.json").write_text(json.dumps(diag, indent=1, default=str))
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} ({info}); see {Path(out) / 'nan_diagnostics.json'}"
    )


def weights_finite(model: torch.nn.Module) -> bool:
    """Collective: True when every rank's parameters are finite."""

    ok = torch.tensor([float(all(bool(torch.isfinite(p).all()) for p in model.parameters()))], device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
