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

from megatron_klear.distributed import broadcast_object, die_with_parent
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
    """True if ``path`` is a completely written checkpoint (its marker was written last)."""
    p = Path(path)
    return (p / MARKER).is_file() and (p / "model" / "metadata.json").is_file()


def _storage_sizes(model_dir: Path) -> dict[str, int]:
    """Bytes each data file of a torch_dist checkpoint must hold, from its ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(model_dir)).read_metadata()
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """What is missing or broken in the checkpoint at ``path``, naming the file; None when every
    file is there, readable and as long as the metadata says. Reads metadata only (cheap at any
    model size); corruption inside a data file of the right length shows only when loading."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} does not exist"
    model = p / "model"
    for f in (p / MARKER, p / "config.json", model / "metadata.json", model / ".metadata", model / "common.pt"):
        if not f.is_file():
            return f"{f} is missing" + (" (an interrupted write?)" if f.name == MARKER else "")
    for f in (p / MARKER, p / "config.json", model / "metadata.json"):
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as e:
            return f"{f} is not valid JSON ({e})"
    try:
        sizes = _storage_sizes(model)
    except Exception as e:
        return f"{model / '.metadata'} is unreadable ({type(e).__name__}: {e})"
    for name, need in sorted(sizes.items()):
        f = model / name
        if not f.is_file():
            return f"{f} is missing (listed in {model / '.metadata'})"
        if f.stat().st_size < need:
            return f"{f} is truncated: {f.stat().st_size} of {need} bytes"
    try:
        torch.load(model / "common.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        return f"{model / 'common.pt'} is unreadable ({type(e).__name__}: {e})"
    return None


def read_marker(path: str | Path) -> dict:
    """The metadata of a complete checkpoint; an error naming the missing or broken file otherwise."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: not a loadable megatron-klear checkpoint: {problem}")
    return json.loads((Path(path) / MARKER).read_text())


def check_output_dir(out: str | Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Refuse to overwrite an existing output unless ``force``, and refuse, even with ``force``,
    an output that is one of ``inputs`` or contains one (replacing it would delete the input)."""
    target = Path(out).resolve()
    for src in inputs:
        source = Path(src).resolve()
        if source == target or target in source.parents:
            raise CheckpointError(
                f"--out {out} {'is' if source == target else 'contains'} the input {src}: "
                "replacing it would delete the input; choose another --out"
            )
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


_writer_manager = None


def _own_writer_results_queue() -> None:
    """Give Megatron's checkpoint writer a results queue whose manager process dies with us.

    Megatron-Core 0.16 creates it lazily with ``mp.get_context("spawn").Manager()``: a spawned
    server process (a full interpreter with our imports, ~0.3-0.5 GB) that nothing stops when
    the rank is killed; it was reparented to PID 1 and lived on. Ours runs ``die_with_parent``
    first. ``_results_queue`` is Megatron's module global for exactly this queue.
    """
    global _writer_manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _writer_manager is None and getattr(filesystem_async, "_results_queue", False) is None:
        _writer_manager = SyncManager(ctx=mp.get_context("spawn"))
        _writer_manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _writer_manager.Queue()


def save_sharded(state: dict, target: Path) -> None:
    """Megatron ``dist_checkpointing.save`` of a sharded state dict into ``target`` (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _own_writer_results_queue()

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

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: cannot load: {problem}")
    try:
        state, _, absent = dist_checkpointing.load(
            sharded, str(Path(path) / "model"), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as e:  # torch DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot load into this model: {_reason(e)}") from e
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


def _reason(e: BaseException) -> str:
    """The message of a load failure; torch DCP's names only the failing ranks, so its per-rank
    causes are spelled out."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and failures:
        parts = []
        for r, failure in sorted(failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {r}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}" if not str(e).startswith(type(e).__name__) else str(e)


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
