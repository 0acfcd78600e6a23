"""Score k responses per problem and report avg@k and pass@k, as the paper reports them.

* math: the published numbers' scoring (KlearReasoner's ``benchmarks/judge_math.py``:
  math-verify on the whole response against the answer; ``rewards.math.LENIENT``), and beside
  it ``strict``: our training reward's rule (a ``<think>`` block, the last ``\\boxed{}`` after
  it, not cut at the length limit);
* code: solved only when every test passes (binary, as LiveCodeBench grades; the RL code reward
  stays the soft pass rate), in the training sandbox, with LiveCodeBench's code extraction,
  imports and output comparison (``EVAL_CODE``).

avg@k is the mean over problems of the fraction of its k responses that are correct (pass@1
estimated from k samples); pass@k the fraction of problems with at least one. LiveCodeBench
benchmarks also report both per difficulty.

Responses from elsewhere (``read_responses``): JSONL, one row per problem,
``{"id": <the benchmark's id>, "responses": [k strings]}`` (optionally ``"truncated": [k
bools]``); every problem once, every row the same k. Rows of other problems are counted and
left out (one file of all LiveCodeBench problems serves v5 and v6). A tools/eval.py ``--out``
file is one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_klear.data.io import location, read_rows
from megatron_klear.errors import DataError
from megatron_klear.evals.benchmarks import Problem
from megatron_klear.rewards.batch import RewardItem, score_batch
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import LENIENT, MathRewardConfig
from megatron_klear.rewards.types import RewardResult

# LiveCodeBench's grading in our sandbox: all tests (stop at the first failure), its comparison
# and imports, its fence rule, a truncated response graded like any other, 6 s per test (its
# default). LiveCodeBench sets no memory limit; a sandbox needs one: 4 GB of address space.
EVAL_CODE = CodeRewardConfig(
    binary=True, compare="livecodebench", fence="livecodebench", truncated_is_wrong=False, timeout_s=6.0,
    memory_mb=4096,
)  # fmt: skip


def score_problems(
    problems: Sequence[Problem],
    responses: Sequence[Sequence[str]],
    truncated: Optional[Sequence[Sequence[bool]]] = None,
    *,
    workers: int = 4,
    code: CodeRewardConfig = EVAL_CODE,
    math: Optional[MathRewardConfig] = None,
) -> dict[str, list[list[RewardResult]]]:
    """``{"score": results, "strict": results}`` grouped like ``responses`` (``strict`` for
    the math problems only: None elsewhere). ``math``: the strict rule (default: the training
    reward's defaults); its ``timeout_s`` also bounds the lenient check."""
    truncated = truncated or [[False] * len(r) for r in responses]
    strict_math = math or MathRewardConfig()
    lenient = replace(LENIENT, timeout_s=strict_math.timeout_s)
    items = [
        RewardItem(p.ability, text, p.answer if p.ability == "math" else p.tests, cut, p.fn_name)
        for p, texts, cuts in zip(problems, responses, truncated)
        for text, cut in zip(texts, cuts)
    ]
    out = {"score": _grouped(score_batch(items, workers, math_config=lenient, code_config=code), responses)}
    math_items = [it for it in items if it.ability == "math"]
    strict = iter(score_batch(math_items, workers, math_config=strict_math, code_config=code)) if math_items else None
    out["strict"] = [[next(strict) for _ in texts] if p.ability == "math" else None
                     for p, texts in zip(problems, responses)]  # fmt: skip
    return out


def _grouped(flat: list, like: Sequence[Sequence]) -> list[list]:
    out, i = [], 0
    for group in like:
        out.append(flat[i : i + len(group)])
        i += len(group)
    return out


def at_k(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """``avg@k`` and ``pass@k`` of per-problem correctness lists (all of length k)."""
    k = len(correct[0])
    avg = float(np.mean([np.mean(c) for c in correct]))
    return {f"avg@{k}": avg, f"pass@{k}": float(np.mean([any(c) for c in correct]))}


def summarize(problems: Sequence[Problem], scored: dict, benchmark: str, protocol: dict) -> dict:
    """The report: counts, avg@k / pass@k (and ``strict`` for math, ``by_difficulty`` for
    code), the sandbox failures, and the protocol the responses were sampled with."""
    correct = [[r.correct for r in rs] for rs in scored["score"]]
    report = {"benchmark": benchmark, "problems": len(problems), "samples": sum(map(len, correct))}
    report.update(at_k(correct))
    strict = [[r.correct for r in rs] for rs in scored["strict"] if rs is not None]
    if strict:
        report["strict"] = at_k(strict)
    levels = sorted({p.difficulty for p in problems if p.difficulty})
    if levels:
        report["by_difficulty"] = {
            d: {"problems": sum(p.difficulty == d for p in problems),
                **at_k([c for p, c in zip(problems, correct) if p.difficulty == d])}
            for d in levels
        }  # fmt: skip
    report["sandbox_failures"] = sum(r.sandbox_failed for rs in scored["score"] for r in rs)
    report["protocol"] = protocol
    return report


def read_responses(path: str | Path, problems: Sequence[Problem]) -> tuple[list[list[str]], list[list[bool]], int]:
    """Responses and truncation flags for ``problems``, in their order, from ``path`` (module
    docstring), and the number of rows of other problems left out. A summary row (no ``id``, a
    ``summary`` key) is skipped. Raises DataError naming the file and line, or the problems
    without responses."""
    by_id: dict[str, tuple[list[str], list[bool]]] = {}
    known, seen, others = {p.id for p in problems}, set(), 0
    for i, row in read_rows(path):
        where = f"{path}: {location(path, i)}"
        if isinstance(row, Exception):
            raise DataError(f"{where}: {row}")
        if isinstance(row, dict) and "summary" in row and "id" not in row:
            continue
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("responses"), list):
            raise DataError(f'{where}: expected {{"id": ..., "responses": [strings]}}')
        pid, texts = str(row["id"]), row["responses"]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: responses must be a non-empty list of strings")
        cuts = row.get("truncated", [False] * len(texts))
        if not isinstance(cuts, list) or len(cuts) != len(texts) or not all(isinstance(c, bool) for c in cuts):
            raise DataError(f"{where}: truncated must be a list of {len(texts)} booleans")
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} appears twice")
        seen.add(pid)
        if pid not in known:
            others += 1
            continue
        by_id[pid] = (texts, cuts)
    missing = [p.id for p in problems if p.id not in by_id]
    if missing:
        raise DataError(f"{path}: no responses for {len(missing)} problems, e.g. {missing[:3]}")
    counts = {len(by_id[p.id][0]) for p in problems}
    if len(counts) > 1:
        raise DataError(f"{path}: every problem needs the same number of responses, found {sorted(counts)}")
    return [by_id[p.id][0] for p in problems], [by_id[p.id][1] for p in problems], others


def write_results(path: str | Path, problems: Sequence[Problem], responses, scored: dict, report: dict) -> None:
    """JSONL: per problem its id, responses, correctness and reasons (usable again as
    ``--responses``), then ``{"summary": report}``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p, texts, rs, strict in zip(problems, responses, scored["score"], scored["strict"]):
            row = dict(id=p.id, responses=list(texts), correct=[r.correct for r in rs], reasons=[r.reason for r in rs])
            if strict is not None:
                row["strict_correct"] = [r.correct for r in strict]
            if p.difficulty:
                row["difficulty"] = p.difficulty
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"summary": report}) + "\n")
