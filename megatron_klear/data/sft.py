"""Long-CoT SFT data: tokenise once into a memory-mapped cache, pack into fixed budgets.

Cache (one directory per source file, tokenizer and settings)::

    tokens.bin  int32, all samples' token ids back to back
    mask.bin    uint8, the assistant loss mask, aligned with tokens.bin
    index.npy   int64 [n_samples + 1], sample start offsets
    meta.json   source, counts of skipped / truncated / dropped rows

Packing: for each epoch the samples are shuffled by ``(seed, epoch)`` and packed greedily
into sequences of ``seq_len`` tokens. Every pack carries ``cu_seqlens`` (document
boundaries for attention), position ids restarting at 0 for each document, and labels /
loss mask shifted for next-token prediction within each document (the last token of a
document predicts nothing). The data position ``(epoch, pack index)`` is all a checkpoint
needs to resume on exactly the samples it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_klear.config import FilePath
from megatron_klear.console import Progress
from megatron_klear.data.chat import render_chat, validate_messages
from megatron_klear.data.io import SkipCounter, check_bad_fraction, read_rows
from megatron_klear.data.synthetic import SyntheticDataConfig
from megatron_klear.errors import ConfigError, DataError

CACHE_VERSION = 1


@dataclass
class SFTDataConfig:
    """The ``data`` section of an SFT run: where the data is and how to pack it."""

    train: list[FilePath] = field(default_factory=list)  # conversation files (.jsonl / .parquet)
    valid: list[FilePath] = field(default_factory=list)  # validation files (log.eval_interval)
    generate: Optional[FilePath] = None  # write our synthetic data here first if it is missing
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)  # what generate writes
    seq_len: int = 32768  # tokens per packed sequence
    global_batch_tokens: int = 32768 * 128  # tokens per optimizer step (a multiple of seq_len)
    micro_batch_size: int = 1  # packed sequences per micro-batch
    overlong: str = "truncate"  # "truncate" or "drop" samples longer than seq_len
    cache_dir: FilePath = "~/.cache/megatron_klear/sft"  # where token caches are kept (reused across runs)
    workers: int = 1  # tokeniser processes building the cache
    seed: int = 1234  # packing order (shuffled per epoch)
    strict: bool = False  # a malformed row is an error instead of being skipped
    max_bad_fraction: float = 0.01  # more malformed rows than this fraction of a file is an error

    def validate(self, where: str = "data") -> None:
        if not self.train:
            raise ConfigError(f"{where}.train is empty")
        if self.overlong not in ("truncate", "drop"):
            raise ConfigError(f"{where}.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.seq_len < 2 or self.micro_batch_size < 1:
            raise ConfigError(f"{where}.seq_len must be >= 2 and {where}.micro_batch_size >= 1")
        if self.workers < 1:
            raise ConfigError(f"{where}.workers must be >= 1, got {self.workers}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{where}.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.global_batch_tokens < self.seq_len:
            raise ConfigError(
                f"{where}.global_batch_tokens={self.global_batch_tokens} must be at least "
                f"{where}.seq_len={self.seq_len} (one packed sequence per step)"
            )
        if self.global_batch_tokens % self.seq_len:
            raise ConfigError(
                f"{where}.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                f"{where}.seq_len={self.seq_len}"
            )


@dataclass
class PackedSample:
    """One row of a micro-batch: documents back to back, padded at the end.

    ``cu_seqlens`` None marks a plain row (one document, right-padded): attention is just
    causal. ``extra`` holds further per-position arrays that travel with the tokens (RL's
    advantages and log-probs); ``training.batches.micro_batch`` stacks them like the rest.
    """

    input_ids: np.ndarray  # [seq_len] int64
    labels: np.ndarray  # [seq_len] int64, next token within the document (0 where none)
    loss_mask: np.ndarray  # [seq_len] float32, 1 where the label is a supervised token
    position_ids: np.ndarray  # [seq_len] int64, restarting at each document
    cu_seqlens: Optional[np.ndarray]  # [n_docs + 1] int32 document boundaries (padding is its own doc)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more [seq_len] arrays
    doc_tokens: Optional[np.ndarray] = None  # [n real docs] real tokens of each (None: no padding)

    def document_lengths(self) -> np.ndarray:
        """Real tokens of each document: alignment padding and the padding document left out."""
        return np.diff(self.cu_seqlens) if self.doc_tokens is None else self.doc_tokens


def assemble_pack(
    documents: Sequence[tuple[np.ndarray, np.ndarray]], length: int, slots: Optional[Sequence[int]] = None
) -> PackedSample:
    """Lay ``documents`` (token ids, target mask: 1 on tokens to be predicted) back to back
    into ``length`` positions.

    Position t of a document predicts its token t + 1 (the last token predicts nothing), with
    loss where that token's target mask is 1; position ids restart at 0 for every document.
    Document i takes ``slots[i]`` positions (default: its length; a longer slot keeps the extra
    positions, without loss, inside the document). What is left is one padding document.
    """
    ids = np.zeros(length, np.int64)
    labels = np.zeros(length, np.int64)
    loss = np.zeros(length, np.float32)
    pos = np.zeros(length, np.int64)
    cu = [0]
    at = 0
    for d, (toks, target) in enumerate(documents):
        n = len(toks)
        slot = n if slots is None else int(slots[d])
        if n > slot or at + slot > length:
            raise AssertionError(f"document {d} of {n} tokens does not fit a slot of {slot} at {at} of {length}")
        ids[at : at + n] = toks
        labels[at : at + n - 1] = toks[1:]
        loss[at : at + n - 1] = target[1:]
        pos[at : at + slot] = np.arange(slot)
        at += slot
        cu.append(at)
    if at < length:
        pos[at:] = np.arange(length - at)
        cu.append(length)
    real = np.asarray([len(toks) for toks, _ in documents], np.int64)
    return PackedSample(ids, labels, loss, pos, np.asarray(cu, np.int32), doc_tokens=real)


# --- tokenisation cache ----------------------------------------------------------------------

_tok = None


def _init_worker(tokenizer_dir: str) -> None:
    global _tok
    from transformers import AutoTokenizer

    _tok = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode(item: tuple[int, object]) -> tuple[int, Optional[list[int]], Optional[list[int]], str]:
    row_no, row = item
    if isinstance(row, Exception):
        return row_no, None, None, str(row)
    if not isinstance(row, dict) or "messages" not in row:
        return row_no, None, None, "missing field 'messages'"
    try:
        r = render_chat(_tok, row["messages"])
    except ValueError as e:
        return row_no, None, None, str(e)
    if not any(r.loss_mask):
        return row_no, None, None, "no assistant message"
    return row_no, r.input_ids, r.loss_mask, ""


def _cache_key(path: Path, tokenizer: str) -> str:
    st = path.stat()
    tok_files = sorted(Path(tokenizer).glob("tokenizer*.json"))
    h = hashlib.sha256()
    h.update(f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for f in tok_files:
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def build_cache(path: str | Path, cfg: SFTDataConfig, tokenizer: str) -> Path:
    """Tokenise ``path`` into the cache (once; later calls reuse it). Returns the directory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    root = Path(os.path.expanduser(cfg.cache_dir))
    out = root / f"{path.stem}-{_cache_key(path, tokenizer)}"
    if (out / "meta.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skips = SkipCounter()
    offsets = [0]
    progress = Progress(f"token cache of {path}", unit="rows", of_what="the file")
    read = [0.0]  # share of the file read so far (JSONL)
    rows = read_rows(path, on_bytes=lambda done, total: read.__setitem__(0, done / max(total, 1)))
    try:
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            if cfg.workers > 1:
                pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (tokenizer,))
                results = pool.imap(_encode, rows, chunksize=64)
            else:
                pool = None
                _init_worker(tokenizer)
                results = map(_encode, rows)
            try:
                for row_no, ids, mask, why in results:
                    progress.update(len(offsets) - 1 + len(skips), read[0] or None)
                    if ids is None:
                        skips.add(str(path), row_no, why, cfg.strict)
                        continue
                    ft.write(np.asarray(ids, dtype=np.int32).tobytes())
                    fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
                    offsets.append(offsets[-1] + len(ids))
            finally:
                if pool is not None:
                    pool.terminate()
        progress.finish()
        np.save(tmp / "index.npy", np.asarray(offsets, dtype=np.int64))
        meta = dict(
            source=str(path.resolve()),
            samples=len(offsets) - 1,
            tokens=offsets[-1],
            skipped=[list(s) for s in skips.skipped],
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(out)  # complete caches only
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class TokenCache:
    """Memory-mapped view of one cache directory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.index = np.load(directory / "index.npy")
        n = int(self.index[-1])
        self.tokens = (
            np.memmap(directory / "tokens.bin", dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, np.int32)
        )
        self.mask = (
            np.memmap(directory / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        )

    def __len__(self) -> int:
        return len(self.index) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.index[i], self.index[i + 1]
        return self.tokens[a:b], self.mask[a:b]


def check_sft_rows(path: str | Path, cfg: SFTDataConfig, limit: int = 1000) -> str:
    """``--dry-run``: the first ``limit`` rows of ``path`` decode and hold valid conversations
    (no tokenizer needed); raises like a run would on too many bad ones. Returns a summary."""
    skips, n = SkipCounter(), 0
    for i, row in read_rows(path):
        if n >= limit:
            break
        n += 1
        why = str(row) if isinstance(row, Exception) else ""
        if not why:
            try:
                if not isinstance(row, dict) or "messages" not in row:
                    raise DataError("missing field 'messages'")
                validate_messages(list(row["messages"]))
            except ValueError as e:
                why = str(e)
        if why:
            skips.add(str(path), i, why, cfg.strict)
    if n == 0:
        raise DataError(f"{path}: no rows")
    skips.check(str(path), n, cfg.max_bad_fraction)
    return f"first {n} rows read, {len(skips)} malformed"


# --- packing -----------------------------------------------------------------------------------


class SFTDataset:
    """Packed SFT sequences over one or more cached files, in a resumable order."""

    def __init__(self, cfg: SFTDataConfig, tokenizer: str, paths: Optional[Sequence[str]] = None, align: int = 1):
        """``paths``: the files to pack (default ``cfg.train``); ``tokenizer``: its directory.

        Every document's slot in a pack is rounded up to a multiple of ``align`` (the extra
        positions are padding with no loss). Context parallel needs 2 x cp: Transformer Engine
        splits each document into 2 x cp equal chunks.
        """
        paths = list(cfg.train if paths is None else paths)
        if cfg.overlong not in ("truncate", "drop"):
            raise DataError(f"data.overlong must be 'truncate' or 'drop', got {cfg.overlong!r}")
        if cfg.seq_len < 2:
            raise DataError(f"data.seq_len must be >= 2, got {cfg.seq_len}")
        if not paths:
            raise DataError("data.train is empty")
        if align < 1 or cfg.seq_len % align:
            raise DataError(f"data.seq_len={cfg.seq_len} is not a multiple of the document alignment {align}")
        self.cfg, self.paths, self.align = cfg, paths, align
        self.caches = [TokenCache(build_cache(p, cfg, tokenizer)) for p in paths]
        # Too many bad rows is checked here, not while building: a cache is reused by later runs,
        # whose data.max_bad_fraction may differ.
        for path, cache in zip(paths, self.caches):
            skipped = cache.meta["skipped"]
            bad = len(skipped)
            check_bad_fraction(
                path, bad, len(cache) + bad, cfg.max_bad_fraction, "data.max_bad_fraction", skipped[0] if bad else None
            )
        self.refs = [(c, i) for c, cache in enumerate(self.caches) for i in range(len(cache))]
        if not self.refs:
            raise DataError(f"no usable samples in {', '.join(paths)} (every row was malformed or empty)")
        lengths = np.array([self.caches[c].index[i + 1] - self.caches[c].index[i] for c, i in self.refs])
        self.too_long = int((lengths > cfg.seq_len).sum())
        if cfg.overlong == "drop":
            keep = lengths <= cfg.seq_len
            self.refs = [r for r, k in zip(self.refs, keep) if k]
            lengths = lengths[keep]
            if not self.refs:
                raise DataError(f"every sample is longer than data.seq_len={cfg.seq_len} and overlong='drop'")
        self.lengths = np.minimum(lengths, cfg.seq_len)
        self.slots = -(-self.lengths // align) * align  # positions each sample takes in a pack
        self._plans: dict[int, list[list[int]]] = {}

    @property
    def skipped(self) -> int:
        return sum(len(c.meta["skipped"]) for c in self.caches)

    def stats(self) -> dict:
        return dict(
            samples=len(self.refs),
            tokens=int(self.lengths.sum()),
            skipped=self.skipped,
            truncated=self.too_long if self.cfg.overlong == "truncate" else 0,
            dropped=self.too_long if self.cfg.overlong == "drop" else 0,
        )

    def plan(self, epoch: int) -> list[list[int]]:
        """The packs of an epoch: lists of sample indices, deterministic by (seed, epoch)."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            order = rng.permutation(len(self.refs))
            packs, cur, used = [], [], 0
            for i in order:
                n = int(self.slots[i])
                if cur and used + n > self.cfg.seq_len:
                    packs.append(cur)
                    cur, used = [], 0
                cur.append(int(i))
                used += n
            if cur:
                packs.append(cur)
            self._plans = {epoch: packs}  # keep one epoch's plan in memory
        return self._plans[epoch]

    def packs_per_epoch(self) -> int:
        return len(self.plan(0))

    def build(self, sample_ids: list[int]) -> PackedSample:
        """Assemble one packed sequence of ``seq_len`` tokens from sample indices."""
        L = self.cfg.seq_len
        docs, slots, at = [], [], 0
        for i in sample_ids:
            c, j = self.refs[i]
            toks, mask = self.caches[c].sample(j)
            n = min(len(toks), L - at)  # overlong samples are truncated to the pack
            docs.append((toks[:n], mask[:n]))
            slots.append(min(int(self.slots[i]), L - at))  # rounded up to the alignment
            at += slots[-1]
        return assemble_pack(docs, L, slots)

    def iterate(self, start_epoch: int = 0, start_pack: int = 0) -> Iterator[tuple[int, int, PackedSample]]:
        """Yield ``(epoch, pack_index, sample)`` forever from a data position."""
        epoch, k = start_epoch, start_pack
        while True:
            packs = self.plan(epoch)
            while k < len(packs):
                yield epoch, k, self.build(packs[k])
                k += 1
            epoch, k = epoch + 1, 0
