"""Streaming reads and writes of HF safetensors checkpoints (sharded, with index), and the
generation config an exported model is served with."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
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


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data offset, header dict) of a safetensors file; a clear error if it is not one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 * 2**20:
                raise CheckpointError(f"{path}: not a readable safetensors file (implausible header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return 8 + n, header


class HFReader:
    """Per-tensor access to an HF safetensors checkpoint directory.

    Tensors are read with ``readinto`` into their own buffers rather than through a memory
    map: a mapped file keeps every page it touched resident in this process, so converting a
    model would otherwise hold the whole file on top of the model.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from e
        elif (self.dir / SINGLE).is_file():
            weight_map = {k: SINGLE for k in read_safetensors_header(self.dir / SINGLE)[1]}
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE} or {INDEX} found")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir}: shard files listed in the index are missing: {', '.join(missing)}")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[int, dict]] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def require(self, names: list[str]) -> None:
        """Fail early, naming what is missing, if any of ``names`` is absent."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.dir}: partial checkpoint, missing tensors {', '.join(missing[:5])}{more}")

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` from its file's header (nothing is loaded)."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found (partial checkpoint?)")
        fname = self.weight_map[name]
        if fname not in self._headers:
            self._headers[fname] = read_safetensors_header(self.dir / fname)
        header = self._headers[fname][1]
        if name not in header:
            raise CheckpointError(f"{self.dir / fname}: tensor {name!r} is listed in the index but not in the file")
        return tuple(header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found (partial checkpoint?)")
        fname = self.weight_map[name]
        path = self.dir / fname
        if fname not in self._headers:
            self._headers[fname] = read_safetensors_header(path)
        offset, header = self._headers[fname]
        if name not in header:
            raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but not in the file")
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        out = torch.empty(info["shape"], dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes != end - begin:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
        with open(path, "rb") as f:
            f.seek(offset + begin)
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{path}: truncated file, tensor {name!r} has {got} of {nbytes} bytes")
        return out


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
            (self.dir / final).chmod(file_mode())  # safetensors writes 0600; a served model is shared
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def file_mode() -> int:
    """The mode an ordinary new file gets here: 0666 minus the umask (0644 with the usual 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def _token_id(model_dir: Path, token: str) -> Optional[int]:
    """The id of special token ``token`` from tokenizer.json / tokenizer_config.json, if listed."""
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        for t in json.loads(tok.read_text()).get("added_tokens", []):
            if t.get("content") == token:
                return int(t["id"])
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        for i, t in json.loads(cfg.read_text()).get("added_tokens_decoder", {}).items():
            if t.get("content") == token:
                return int(i)
    return None


def _chat_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = model_dir / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template", "") if cfg.is_file() else ""
    return template if isinstance(template, str) else json.dumps(template)


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def write_generation_config(model_dir: str | Path, temperature: float, top_p: float, top_k: int = -1) -> dict:
    """Make ``model_dir/generation_config.json`` sample as our evaluation does, and stop at the
    end of a chat turn: its eos ids are those of the model and of any generation config already
    there, plus ``<|im_end|>`` when the chat template ends turns with it. Returns what it wrote."""
    d = Path(model_dir)
    path = d / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    model_cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    eos = _ids(gen.get("eos_token_id")) + _ids(model_cfg.get("eos_token_id"))
    im_end = _token_id(d, "<|im_end|>")
    if im_end is not None and "<|im_end|>" in _chat_template(d):
        eos.insert(0, im_end)
    gen.update(do_sample=temperature > 0, temperature=temperature, top_p=top_p)
    if top_k > 0:
        gen["top_k"] = top_k
    if eos:
        gen["eos_token_id"] = list(dict.fromkeys(eos))
    for key in ("bos_token_id", "pad_token_id"):
        if key not in gen and model_cfg.get(key) is not None:
            gen[key] = model_cfg[key]
    path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return gen


def iter_tensors(reader: HFReader, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, so at most one is held by this generator."""
    for n in names:
        yield n, reader.get(n)
