"""Streaming reads and writes of HF safetensors checkpoints (sharded, with index)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_klear.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied verbatim from the HF source next to the weights (tokenizer, generation config).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class HFReader:
    """Lazy, per-tensor access to an HF safetensors checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from e
        elif (self.dir / SINGLE).is_file():
            with safe_open(self.dir / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE} or {INDEX} found")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir}: shard files listed in the index are missing: {', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def close(self) -> None:
        """Drop the memory maps of the shard files (their pages count as resident)."""
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def require(self, names: list[str]) -> None:
        """Fail early, naming what is missing, if any of ``names`` is absent."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.dir}: partial checkpoint, missing tensors {', '.join(missing[:5])}{more}")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found (partial checkpoint?)")
        fname = self.weight_map[name]
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(self.dir / fname, "pt")
            except Exception as e:  # truncated or corrupt shard
                raise CheckpointError(f"{self.dir / fname}: cannot read safetensors ({e})") from e
        try:
            return self._handles[fname].get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {name!r} ({e})") from e


class HFWriter:
    """Writes tensors into size-bounded safetensors shards plus an index, as HF does."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.dir / tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, give shards their final names and write the index."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / tmp).rename(self.dir / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def iter_tensors(reader: HFReader, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, so at most one is held by this generator."""
    for n in names:
        yield n, reader.get(n)
