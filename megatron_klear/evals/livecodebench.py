"""LiveCodeBench ``code_generation_lite`` rows as released, read as LiveCodeBench's own loader
reads them (``lcb_runner/benchmarks/code_generation.py``; read, not copied).

A row: ``question_id``, ``question_title``, ``question_content``, ``platform``,
``contest_id``, ``contest_date`` (ISO), ``starter_code``, ``difficulty`` (easy / medium / hard),
``public_test_cases`` (a JSON string), ``private_test_cases`` (a JSON string, or
base64(zlib(pickle(JSON string))) in the later releases) and ``metadata`` (a JSON string;
``func_name`` marks a LeetCode-style functional problem). Each test is ``{input, output,
testtype: stdin | functional}``; a functional test's input holds one JSON value per line (the
arguments) and its output the returned value's JSON. A problem is graded on its public and then
its private tests, as LiveCodeBench grades it. The pickle is read by an unpickler that refuses
every global, so a file can only ever yield the JSON text it is meant to hold.

Release windows (``in_window``): LiveCodeBench's loader keeps ``start <= contest_date <= end``
with the bounds read as midnight of the given days.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import zlib
from datetime import datetime
from typing import Any, Optional

from megatron_klear.errors import DataError
from megatron_klear.rewards.code import normalize_tests

DIFFICULTIES = ("easy", "medium", "hard")
REQUIRED = ("question_id", "question_content", "public_test_cases", "private_test_cases", "contest_date")


class _JsonTextOnly(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case pickle")


def decode_test_cases(value: Any, field: str) -> list[dict]:
    """A test-case field as a list of test dicts: a list already, a JSON string, or
    base64(zlib(pickle(JSON string))). Raises DataError naming ``field``."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise DataError(f"{field} must be a JSON string, got {type(value).__name__}")
    try:
        tests = json.loads(value)
    except json.JSONDecodeError:
        try:
            raw = zlib.decompress(base64.b64decode(value.encode("utf-8")))
            text = _JsonTextOnly(io.BytesIO(raw)).load()
            tests = json.loads(text) if isinstance(text, (str, bytes)) else text
        except (binascii.Error, zlib.error, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{field} is neither JSON nor base64(zlib(pickle(JSON))): {e}") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise DataError(f"{field} must decode to a list of test objects")
    return tests


def prompt_text(question: str, starter_code: str) -> str:
    """Our instruction around a problem: complete the starter code (functional), or read
    standard input and write standard output; one ```python block either way."""
    if starter_code.strip():
        return (
            f"{question}\n\nSolve the problem in Python by completing the starter code below. Give your "
            f"complete solution in one ```python code block.\n\n```python\n{starter_code}\n```"
        )
    return (
        f"{question}\n\nSolve the problem in Python: read the input from standard input and write the answer "
        f"to standard output. Give your complete program in one ```python code block."
    )


def contest_day(value: Any) -> datetime:
    """``contest_date`` as a datetime (ISO text, or a datetime from a Parquet column)."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    try:
        return datetime.fromisoformat(str(value)).replace(tzinfo=None)
    except ValueError:
        raise DataError(f"contest_date {value!r} is not an ISO date") from None


def in_window(day: datetime, start: Optional[str], end: Optional[str]) -> bool:
    """LiveCodeBench's release window: ``start <= day <= end`` (bounds at midnight)."""
    if start is not None and day < datetime.strptime(start, "%Y-%m-%d"):
        return False
    return end is None or day <= datetime.strptime(end, "%Y-%m-%d")


def parse_row(row: Any) -> dict:
    """One ``code_generation_lite`` row -> the fields of an evaluation problem (``id``,
    ``prompt``, ``tests``, ``fn_name``, ``difficulty``, ``contest_date``). Raises DataError
    naming what is wrong."""
    if not isinstance(row, dict):
        raise DataError("row is not an object")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise DataError(f"missing field {missing[0]!r} (a LiveCodeBench code_generation_lite row has {REQUIRED})")
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"metadata is not JSON: {e}") from None
    if not isinstance(metadata, dict):
        raise DataError("metadata must be a JSON object")
    tests = decode_test_cases(row["public_test_cases"], "public_test_cases") + decode_test_cases(
        row["private_test_cases"], "private_test_cases"
    )
    fn_name = metadata.get("func_name")
    normalize_tests(tests, fn_name)  # every test well formed (functional ones need func_name)
    difficulty = str(row.get("difficulty") or "").lower() or None
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise DataError(f"difficulty must be one of {DIFFICULTIES}, got {row.get('difficulty')!r}")
    return dict(
        id=str(row["question_id"]),
        prompt=prompt_text(str(row["question_content"]), str(row.get("starter_code") or "")),
        tests=tests,
        fn_name=fn_name,
        difficulty=difficulty,
        contest_date=contest_day(row["contest_date"]),
    )
