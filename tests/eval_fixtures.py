"""Benchmark files written in each public schema (we cannot download the real ones here), with
responses whose verdicts are known by hand.

Math: HuggingFaceH4/aime_2024 (``id``, ``problem``, ``solution``, ``answer``, ``url``, ``year``;
Parquet), a 2025 set (``question`` / ``answer``, no id; JSONL), KlearReasoner's
``benchmarks/aime24.qs.jsonl`` (``messages`` + ``meta``) and MathArena's HMMT (``problem_idx``).
LiveCodeBench: ``code_generation_lite`` rows as released: JSON ``public_test_cases``, private
tests as JSON or base64(zlib(pickle(JSON))), ``metadata`` JSON with ``func_name`` for the
functional problem, stdin problems, and rows outside the v5 / v6 windows.
"""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path


def compressed(tests: list[dict]) -> str:
    """How the later LiveCodeBench releases store private tests."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def aime24_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        dict(id=60, problem="Find $2+3$.", solution="It is $5$.", answer="5", url="u", year="2024"),
        dict(id=61, problem="Find $\\frac{1}{2}+\\frac{1}{4}$ as a fraction.", solution="...", answer="\\frac{3}{4}",
             url="u", year="2024"),
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def aime25_jsonl(path: Path) -> Path:
    return write_jsonl(path, [{"question": "What is 6 times 7?", "answer": 42}, {"question": "1+1?", "answer": "2"}])


def klear_aime_jsonl(path: Path) -> Path:
    meta = {"unique_id": "2024-II-1", "problem": "Find 70 + 3.", "solution": "73", "answer": "73"}
    return write_jsonl(path, [{"messages": [{"role": "user", "content": "Find 70 + 3."}], "meta": meta}])


def hmmt_jsonl(path: Path) -> Path:
    row = {"problem_idx": 1, "problem": "Compute 9 - 4.", "answer": "5", "problem_type": ["Algebra"]}
    return write_jsonl(path, [row])


ADD_STDIN = [  # one line "a b", print a + b
    {"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
    {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
]
ADD_PRIVATE = [{"input": "100 200\n", "output": "300\n", "testtype": "stdin"}]
TWO_SUM = [  # functional: the arguments one JSON value per line, the returned value's JSON
    {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
    {"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"},
]
TWO_SUM_PRIVATE = [{"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]
STARTER = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        "


def lcb_row(qid: str, date: str, difficulty: str, public: list, private, starter: str = "", func: str = "") -> dict:
    return dict(
        question_title=qid, question_content=f"Problem {qid}.", platform="leetcode" if func else "atcoder",
        question_id=qid, contest_id="c1", contest_date=date, starter_code=starter, difficulty=difficulty,
        public_test_cases=json.dumps(public), private_test_cases=private,
        metadata=json.dumps({"func_name": func} if func else {}),
    )  # fmt: skip


def livecodebench_jsonl(path: Path) -> Path:
    """Four problems: a stdin problem in v6 (JSON private tests), a functional one in v5
    (compressed private tests), and two outside both windows."""
    rows = [
        lcb_row("abc400_a", "2025-03-15T00:00:00", "easy", ADD_STDIN, json.dumps(ADD_PRIVATE)),
        lcb_row("3000", "2024-09-01T00:00:00", "medium", TWO_SUM, compressed(TWO_SUM_PRIVATE), STARTER, "twoSum"),
        lcb_row("abc360_a", "2024-07-15T00:00:00", "hard", ADD_STDIN, json.dumps(ADD_PRIVATE)),
        lcb_row("abc410_a", "2025-05-02T00:00:00", "easy", ADD_STDIN, compressed(ADD_PRIVATE)),
    ]
    return write_jsonl(path, rows)


def fenced(code: str) -> str:
    return f"<think>let me think</think>\n```python\n{code}\n```"


ADD_OK = "a, b = map(int, input().split())\nprint(a + b)"
ADD_WRONG_ON_PRIVATE = "a, b = map(int, input().split())\nprint(a + b if abs(a) < 50 else 0)"
# uses List without importing it: runs only after LiveCodeBench's imports, as there
TWO_SUM_OK = (
    "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
    "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
    "                return (seen[target - x], i)\n            seen[x] = i\n"
)
TWO_SUM_WRONG = STARTER + "return [0, 1]\n"
