"""RL prompt sets in the schema of KlearReasoner-MathSub-30K / CodeSub-15K (verl style).

Each row: ``data_source``, ``prompt`` (a list of chat messages), ``ability`` (``math`` or
``code``), ``reward_model: {style, ground_truth}``, ``extra_info``. For code, ``ground_truth`` is
JSON test cases in LiveCodeBench or APPS/TACO shape (see ``rewards.code``).

Curation options from the paper: drop code problems with fewer than N tests (16), exact
de-duplication of prompts, and an n-gram overlap filter against evaluation prompts (9-gram).
Pass the evaluation *problem texts* to the n-gram filter: a long instruction header shared
by training and evaluation prompts would match everything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_klear.data.chat import validate_messages
from megatron_klear.data.io import SkipCounter, read_rows
from megatron_klear.errors import DataError
from megatron_klear.rewards.code import normalize_tests

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RLPrompt:
    """One RL prompt with what its reward needs."""

    uid: str
    data_source: str
    ability: str
    messages: list
    ground_truth: Any  # math: answer string; code: tests (JSON text or object)
    fn_name: Optional[str] = None
    extra_info: dict = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


@dataclass
class CurationConfig:
    min_code_tests: int = 16  # paper's data curation; 0 keeps all
    dedup: bool = True
    eval_prompts: Sequence[str] = ()
    ngram: int = 9


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def contamination_ngrams(eval_prompts: Sequence[str], n: int, template_frac: float = 0.5) -> set:
    """The eval prompts' word n-grams, minus template text: an n-gram found in more than
    ``template_frac`` of several eval prompts is shared instruction wording, not a problem."""
    counts: dict = {}
    for text in eval_prompts:
        for g in ngrams(text, n):
            counts[g] = counts.get(g, 0) + 1
    limit = max(1, int(template_frac * len(eval_prompts))) if len(eval_prompts) >= 4 else len(eval_prompts)
    return {g for g, c in counts.items() if c <= limit}


def parse_row(row: Any, loc: str) -> RLPrompt:
    """Validate one row of the schema; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise DataError("row is not an object")
    for key in ("prompt", "ability", "reward_model"):
        if key not in row:
            raise DataError(f"missing field {key!r}")
    messages = row["prompt"]
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    validate_messages(messages)
    ability = row["ability"]
    if ability not in ("math", "code"):
        raise DataError(f"ability must be 'math' or 'code', got {ability!r}")
    rm = row["reward_model"]
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError("reward_model must be an object with 'ground_truth'")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError("extra_info must be an object")
    gt = rm["ground_truth"]
    fn_name = extra.get("fn_name")
    if ability == "code":
        _, fn_name = normalize_tests(gt, fn_name)  # raises on invalid test JSON
    elif not isinstance(gt, (str, int, float)):
        raise DataError("math ground_truth must be a string or a number")
    uid = str(extra.get("index", loc))
    return RLPrompt(
        uid,
        str(row.get("data_source", "")),
        ability,
        list(messages),
        gt if ability == "code" else str(gt),
        fn_name,
        dict(extra),
    )


def load_rl_prompts(
    paths: Sequence[str],
    curation: Optional[CurationConfig] = None,
    strict: bool = False,
    max_bad_fraction: float = 1.0,
) -> tuple[list[RLPrompt], dict]:
    """Read and curate RL prompt files; returns ``(prompts, stats)``.

    Malformed rows (not UTF-8, not JSON, not the schema) are skipped and counted with file and
    line (or raise with ``strict``); more than ``max_bad_fraction`` of a file's rows is an
    error, and so is an empty result, never a silent zero-step run.
    """
    cur = curation or CurationConfig()
    skips = SkipCounter()
    prompts: list[RLPrompt] = []
    for path in paths:
        rows = 0
        for i, row in read_rows(path):
            rows += 1
            if isinstance(row, Exception):
                skips.add(str(path), i, str(row), strict)
                continue
            try:
                prompts.append(parse_row(row, f"{Path(path).name}:{i}"))
            except ValueError as e:
                skips.add(str(path), i, str(e), strict)
        skips.check(str(path), rows, max_bad_fraction)
    stats = dict(read=len(prompts) + len(skips), skipped=len(skips), few_tests=0, duplicates=0, contaminated=0)
    kept = []
    seen = set()
    eval_grams = contamination_ngrams(cur.eval_prompts, cur.ngram)
    for p in prompts:
        if p.ability == "code" and cur.min_code_tests:
            n_tests = len(normalize_tests(p.ground_truth, p.fn_name)[0])
            if n_tests < cur.min_code_tests:
                stats["few_tests"] += 1
                continue
        if cur.dedup:
            key = " ".join(p.prompt_text.split())
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
        if eval_grams and ngrams(p.prompt_text, cur.ngram) & eval_grams:
            stats["contaminated"] += 1
            continue
        kept.append(p)
    stats["kept"] = len(kept)
    if not kept:
        raise DataError(f"no RL prompts left from {', '.join(map(str, paths))} ({stats})")
    return kept, stats


def to_row(p: RLPrompt) -> dict:
    """The schema row of a prompt (ground truth as JSON text for code, like the public sets)."""
    gt = p.ground_truth if isinstance(p.ground_truth, str) else json.dumps(p.ground_truth)
    return dict(
        data_source=p.data_source,
        prompt=p.messages,
        ability=p.ability,
        reward_model=dict(style="rule", ground_truth=gt),
        extra_info=p.extra_info,
    )


def write_parquet(rows: list[dict], path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
