"""Row readers for JSONL and Parquet files, with per-row locations for error reports."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_klear.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SkipCounter:
    """Malformed rows that were skipped, with where they were and why."""

    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, path: str, row: int, why: str, strict: bool) -> None:
        msg = f"{path}: row {row}: {why}"
        if strict:
            raise DataError(msg)
        self.skipped.append((path, row, why))
        if len(self.skipped) <= 10:
            log.warning("skipping %s", msg)

    def __len__(self) -> int:
        return len(self.skipped)


def read_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(row_number, row)`` from a ``.jsonl``/``.json`` or ``.parquet`` file.

    A JSONL line that is not JSON is yielded as a ``DataError`` instance (the caller decides
    whether to skip it); a file that cannot be read raises ``DataError`` naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield i, DataError(f"not valid JSON ({e})")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: cannot read ({e})") from e
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
