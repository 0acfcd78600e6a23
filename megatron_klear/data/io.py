"""Row readers for JSONL and Parquet files, with per-row locations for error reports.

A bad row is the row's problem, not the file's: a JSONL line that is not UTF-8 or not JSON is
yielded as a ``DataError`` (the caller skips and counts it, naming file and line), like a row
of the wrong shape; only too many of them (``SkipCounter.check``) stops a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from megatron_klear.errors import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")


def location(path: str | Path, row: int) -> str:
    """How a message names row ``row`` (0-based) of ``path``: ``line N`` (1-based) in JSONL,
    ``row N`` in Parquet."""
    return f"line {row + 1}" if Path(path).suffix.lower() in JSONL_SUFFIXES else f"row {row}"


@dataclass
class SkipCounter:
    """Malformed rows that were skipped, with where they were and why."""

    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, path: str, row: int, why: str, strict: bool) -> None:
        msg = f"{path}: {location(path, row)}: {why}"
        if strict:
            raise DataError(msg)
        self.skipped.append((path, row, why))
        if len(self.skipped) <= 10:
            log.warning("skipping %s", msg)

    def __len__(self) -> int:
        return len(self.skipped)

    def check(self, path: str, rows: int, max_fraction: float, key: str = "data.max_bad_fraction") -> None:
        """Raise when more than ``max_fraction`` of the ``rows`` rows read from ``path`` were bad."""
        bad = [s for s in self.skipped if s[0] == str(path)]
        check_bad_fraction(path, len(bad), rows, max_fraction, key, bad[0] if bad else None)


def check_bad_fraction(
    path: str | Path, bad: int, rows: int, max_fraction: float, key: str, first: Optional[tuple] = None
) -> None:
    """Raise naming ``path`` when ``bad`` of ``rows`` rows is more than ``max_fraction``."""
    if rows and bad / rows > max_fraction:
        example = f"; the first: {location(path, first[1])}: {first[2]}" if first else ""
        raise DataError(
            f"{path}: {bad} of {rows} rows are malformed ({100 * bad / rows:.1f}% > {key}={max_fraction}){example}"
        )


def read_rows(path: str | Path, on_bytes: Optional[Callable[[int, int], None]] = None) -> Iterator[tuple[int, object]]:
    """Yield ``(row_number, row)`` from a ``.jsonl``/``.json`` or ``.parquet`` file.

    A JSONL line that is not UTF-8 or not JSON is yielded as a ``DataError`` instance (the
    caller decides whether to skip it); a file that cannot be read raises ``DataError`` naming
    it. ``on_bytes(done, total)`` follows the reading of a JSONL file (progress lines).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_rows(p, on_bytes)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:
            raise DataError(f"{p}: cannot read Parquet ({e})") from e
        for i, row in enumerate(table.to_pylist()):
            yield i, row
    else:
        raise DataError(f"{p}: unsupported data file type {suffix!r} (use .jsonl or .parquet)")


def _jsonl_rows(p: Path, on_bytes: Optional[Callable[[int, int], None]]) -> Iterator[tuple[int, object]]:
    try:
        total, done = p.stat().st_size, 0
        with open(p, "rb") as f:
            for i, raw in enumerate(f):
                done += len(raw)
                if on_bytes is not None:
                    on_bytes(done, total)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield i, DataError(f"not valid UTF-8 (byte {e.start} of the line: {raw[e.start : e.start + 4]!r})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, DataError(f"not valid JSON ({e})")
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e})") from e
