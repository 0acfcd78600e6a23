"""The paper's benchmarks, read from their public files, and the protocol each is run with.

* ``aime24``, ``aime25``, ``hmmt25`` (avg@64): rows with a question and an answer:
  ``problem`` / ``answer`` (HuggingFaceH4/aime_2024, MathArena's sets), ``question`` /
  ``answer`` (the 2025 sets), or KlearReasoner's ``benchmarks/*.jsonl`` (``messages`` with
  ``meta.solution`` or ``answer``); other columns by ``question_key`` / ``answer_key`` /
  ``id_key`` (a dotted key reaches into an object).
* ``lcb_v5``, ``lcb_v6``, ``livecodebench`` (avg@8): LiveCodeBench ``code_generation_lite`` rows
  (``evals.livecodebench``); v5 keeps contests 2024-08-01 .. 2025-02-01, v6 2025-02-01 ..
  2025-05-01, ``livecodebench`` every row.

Every protocol samples at temperature 0.6, top_p 0.95, with up to 32,768 new tokens (the paper's
32K budget; capped by the model's context, and raised by the 64K YaRN setting of
``examples/qwen3_8b/eval_64k.yaml``). A malformed row or a repeated id is an error naming the
file and line: a benchmark must not lose a problem silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional, Sequence

from megatron_klear.data.chat import validate_messages
from megatron_klear.data.io import location, read_rows
from megatron_klear.errors import DataError
from megatron_klear.evals import livecodebench

# Tried in order when the caller names no key.
QUESTION_KEYS = ("problem", "question", "Problem", "Question", "messages", "prompt")
ANSWER_KEYS = ("answer", "Answer", "meta.answer", "meta.solution", "solution")
ID_KEYS = ("id", "ID", "problem_idx", "unique_id", "meta.unique_id")


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is run and scored (the paper's values)."""

    ability: str  # "math" (math-verify on the answer) or "code" (all tests in the sandbox)
    k: int  # samples per problem: avg@k and pass@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768  # the budget; capped by the model's context minus the prompt
    start_date: Optional[str] = None  # LiveCodeBench contest window (inclusive, YYYY-MM-DD)
    end_date: Optional[str] = None


BENCHMARKS = {
    "aime24": Protocol("math", 64),
    "aime25": Protocol("math", 64),
    "hmmt25": Protocol("math", 64),
    "lcb_v5": Protocol("code", 8, start_date="2024-08-01", end_date="2025-02-01"),
    "lcb_v6": Protocol("code", 8, start_date="2025-02-01", end_date="2025-05-01"),
    "livecodebench": Protocol("code", 8),
}


@dataclass(frozen=True)
class Problem:
    """One problem: its benchmark id, the prompt messages, and what scores a response."""

    id: str
    messages: list
    ability: str
    answer: Optional[str] = None  # math
    tests: Optional[list] = None  # code: LiveCodeBench test dicts (public, then private)
    fn_name: Optional[str] = None  # code: a functional (LeetCode-style) problem's function
    difficulty: Optional[str] = None
    contest_date: Optional[datetime] = field(default=None, compare=False)


def lookup(row: dict, key: str) -> Any:
    """``row[key]``, where a dotted key reaches into nested objects; KeyError when absent."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def first_key(row: dict, given: Optional[str], candidates: Sequence[str], what: str) -> str:
    """The key ``given``, or the first of ``candidates`` the row has."""
    if given is not None:
        return given
    for key in candidates:
        try:
            lookup(row, key)
            return key
        except KeyError:
            continue
    raise DataError(f"no {what} field: looked for {', '.join(candidates)} (name one with --{what}-key)")


def math_messages(question: Any, instruction: Optional[str]) -> list:
    """The prompt: the row's own chat messages, or the question as one user message, with
    ``instruction`` after the last user message."""
    if hasattr(question, "tolist"):
        question = question.tolist()
    if isinstance(question, list):
        validate_messages(question)
        messages = [dict(m) for m in question]
    elif isinstance(question, str) and question.strip():
        messages = [{"role": "user", "content": question}]
    else:
        raise DataError(f"the question must be text or a list of chat messages, got {type(question).__name__}")
    if instruction:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last] = {**messages[last], "content": f"{messages[last]['content']}\n\n{instruction}"}
    return messages


def math_problem(row: dict, keys: dict, index: int, instruction: Optional[str]) -> Problem:
    """One math row -> a Problem. ``keys``: the question / answer / id keys (None: look them up)."""
    if not isinstance(row, dict):
        raise DataError("row is not an object")
    question = lookup(row, first_key(row, keys.get("question"), QUESTION_KEYS, "question"))
    answer = lookup(row, first_key(row, keys.get("answer"), ANSWER_KEYS, "answer"))
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
        raise DataError(f"the answer must be a number or text, got {answer!r}")
    try:
        pid = lookup(row, first_key(row, keys.get("id"), ID_KEYS, "id"))
    except ValueError:
        pid = index  # no id column: the row's position
    return Problem(str(pid), math_messages(question, instruction), "math", answer=str(answer).strip())


def code_problem(row: dict, start: Optional[str], end: Optional[str]) -> Optional[Problem]:
    """One LiveCodeBench row -> a Problem, or None when its contest is outside the window."""
    p = livecodebench.parse_row(row)
    if not livecodebench.in_window(p["contest_date"], start, end):
        return None
    return Problem(p["id"], [{"role": "user", "content": p["prompt"]}], "code", tests=p["tests"],
                   fn_name=p["fn_name"], difficulty=p["difficulty"], contest_date=p["contest_date"])  # fmt: skip


def load_problems(
    name: str,
    files: Sequence[str],
    *,
    question_key: Optional[str] = None,
    answer_key: Optional[str] = None,
    id_key: Optional[str] = None,
    instruction: Optional[str] = None,
    start_date: Optional[str] = None,
    end_date: Optional[str] = None,
) -> tuple[list[Problem], dict]:
    """The problems of benchmark ``name`` in ``files`` and counts (``rows``, ``outside_window``).

    ``start_date`` / ``end_date`` replace a LiveCodeBench benchmark's window. Raises DataError
    naming the file and line of a malformed row or a repeated id, and when nothing is left.
    """
    protocol = BENCHMARKS[name]
    start = start_date if start_date is not None else protocol.start_date
    end = end_date if end_date is not None else protocol.end_date
    keys = {"question": question_key, "answer": answer_key, "id": id_key}
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    stats = {"rows": 0, "outside_window": 0}
    for path in files:
        for i, row in read_rows(path):
            where = f"{path}: {location(path, i)}"
            if isinstance(row, Exception):
                raise DataError(f"{where}: {row}")
            stats["rows"] += 1
            try:
                if protocol.ability == "math":
                    p = math_problem(row, keys, len(problems), instruction)
                else:
                    p = code_problem(row, start, end)
            except (ValueError, KeyError) as e:
                raise DataError(f"{where}: not a {name} row: {e}") from None
            if p is None:
                stats["outside_window"] += 1
                continue
            if p.id in seen:
                raise DataError(f"{where}: id {p.id!r} repeats {seen[p.id]} (responses are matched by id)")
            seen[p.id] = where
            problems.append(p)
    if not problems:
        window = f" in the window {start} .. {end}" if start or end else ""
        raise DataError(f"no {name} problems{window} in {', '.join(map(str, files))} ({stats})")
    return problems, stats
