"""Megatron-Core distributed checkpoints of a Qwen3 model, written atomically.

Layout of a model checkpoint directory::

    DIR/megatron_klear.json   what this is (written last: its presence marks a complete checkpoint)
    DIR/config.json           the HF config the model was built from
    DIR/<tokenizer files>     copied from the HF source when there is one
    DIR/model/                Megatron-Core dist_checkpointing (torch_dist), TP/PP-agnostic

A checkpoint is written under a temporary sibling name and renamed at the end, so an
interrupted write never leaves a directory that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_klear.distributed import broadcast_object
from megatron_klear.errors import CheckpointError
from megatron_klear.models.config import Qwen3Config

MARKER = "megatron_klear.json"
FORMAT_VERSION = 1


def rank(collective: bool = True) -> int:
    """Global rank, or 0 when not distributed (or ``collective=False``)."""
    return dist.get_rank() if collective and dist.is_initialized() else 0


def barrier(collective: bool = True) -> None:
    """A barrier over all ranks when distributed (and ``collective``)."""
    if collective and dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: Optional[str], collective: bool = True) -> str:
    if not (collective and dist.is_initialized()):
        assert value is not None
        return value
    return broadcast_object(value)


def is_valid_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a completely written checkpoint."""
    p = Path(path)
    return (p / MARKER).is_file() and (p / "model" / "metadata.json").is_file()


def read_marker(path: str | Path) -> dict:
    """The metadata of a complete checkpoint; a clear error otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory does not exist")
    if not is_valid_checkpoint(p):
        raise CheckpointError(
            f"{p}: not a complete megatron-klear checkpoint (missing {MARKER} or model/metadata.json; "
            "an interrupted write?)"
        )
    return json.loads((p / MARKER).read_text())


def check_output_dir(out: str | Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force``."""
    if Path(out).exists() and not force:
        raise CheckpointError(f"{out}: output directory exists; pass --force to replace it")


@contextmanager
def atomic_dir(out: str | Path, force: bool = False, collective: bool = True) -> Iterator[Path]:
    """Yield a temporary directory, shared by all ranks, renamed to ``out`` on success.

    On failure the temporary directory is removed and ``out`` is untouched. With
    ``collective=False`` only this process takes part (offline tools, even when called from
    one rank of a distributed job).
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    tmp = None
    if rank(collective) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time())}")
        Path(tmp).mkdir()
    tmp_path = Path(_broadcast_str(tmp, collective))
    try:
        yield tmp_path
    except BaseException:
        if rank(collective) == 0:
            shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    barrier(collective)
    if rank(collective) == 0:
        old = None
        if out.exists():  # only with force: swap in the new one, then drop the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp_path.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier(collective)


def write_marker(path: Path, cfg: Qwen3Config, **extra) -> None:
    """Write config.json and the completion marker (rank 0). Call last."""
    if rank() != 0:
        return
    (path / "config.json").write_text(json.dumps(cfg.raw, indent=2, sort_keys=True))
    meta = {"format_version": FORMAT_VERSION, "kind": "qwen3-megatron", **extra}
    (path / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True))


def save_sharded(state: dict, target: Path) -> None:
    """Megatron ``dist_checkpointing.save`` of a sharded state dict into ``target`` (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # One writer process per rank: each extra writer holds its own serialisation buffers.
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state, str(target), sharded_strategy=strategy)


# Transformer Engine layers (norms, linears) keep FP8 metadata in ``<module>._extra_state``. A
# checkpoint written by a model without those layers (conversion uses the local spec) lacks some
# of these keys; they carry no weights, so a TE model loads such a checkpoint with its own.
EXTRA_STATE_SUFFIX = "._extra_state"


def load_sharded(sharded: dict, path: str | Path) -> dict:
    """Megatron ``dist_checkpointing.load`` from ``path/model``; failures name the checkpoint.

    Collective. Keys the model asks for and the checkpoint lacks are an error (naming them),
    except Transformer Engine ``_extra_state`` entries, which keep the model's own value.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        state, _, absent = dist_checkpointing.load(
            sharded, str(Path(path) / "model"), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as e:  # torch DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot load into this model: {e}") from e
    lacking = sorted(k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX))
    verdicts = [lacking]
    if dist.is_initialized():  # ranks hold different keys: all of them fail together
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, lacking)
    lacking = sorted({k for v in verdicts for k in v})
    if lacking:
        raise CheckpointError(
            f"{path}: cannot load into this model: the checkpoint lacks {len(lacking)} of its tensors, "
            f"e.g. {', '.join(lacking[:3])}"
        )
    return state


def load_state_checked(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state)`` after checking every shape (errors name tensor and shapes)."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and isinstance(tensor, torch.Tensor) and own[name] is not None:
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {tuple(tensor.shape)} in the checkpoint "
                    f"but {tuple(own[name].shape)} in the model"
                )
    model.load_state_dict(state, strict=False)


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Save this rank's model stage into ``path/model`` (collective over all ranks)."""
    target = path / "model"
    if rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    barrier()
    save_sharded(model.sharded_state_dict(), target)


def load_model(model: torch.nn.Module, path: str | Path) -> dict:
    """Load a checkpoint written at any TP/PP into this rank's model stage.

    Returns the checkpoint's metadata. Shape mismatches name the tensor and both shapes.
    """
    meta = read_marker(path)
    load_state_checked(model, load_sharded(model.sharded_state_dict(), path), path)
    return meta
