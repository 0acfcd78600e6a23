"""Our own small data in the real formats (no downloads are possible on our machines).

* Math prompts with verifiable answers at graded difficulty: 0 two-digit addition worked digit
  by digit (the demo's task, only when asked for), 1 addition / subtraction,
  2 two-step arithmetic, 3 fractions, 4 linear equations. Each row's ``extra_info.solution``
  is a response (``<think>`` steps, then ``\\boxed{answer}``) that the math reward scores correct.
* Code problems, each with 16+ stdin/stdout tests and ``extra_info.reference_solution`` (a
  program that passes all of them in the sandbox).
* SFT conversations built from both: the user prompt and the worked solution.

Everything is deterministic by seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from megatron_klear.data.rl import write_parquet
from megatron_klear.errors import ConfigError

SYNTHETIC_KINDS = ("mixed", "code")
MATH_LEVELS = (0, 1, 2, 3, 4)

MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
CODE_INSTRUCTION = (
    "Write a Python program that reads the input from standard input and prints the answer. "
    "Put the program in a ```python code block."
)


def _frac_tex(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"\\frac{{{f.numerator}}}{{{f.denominator}}}"


def math_problem(rng: random.Random, level: int) -> tuple[str, str, str]:
    """``(question, answer, worked steps)`` at difficulty ``level`` 0..4."""
    if level == 0:
        # Two-digit addition worked digit by digit (the demo's task: each step is a one-digit
        # fact plus a carry, so a tiny model can learn it in minutes and RL can sharpen it).
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        units = a % 10 + b % 10
        tens = a // 10 + b // 10 + units // 10
        steps = (
            f"units: {a % 10} + {b % 10} = {units}, write {units % 10} carry {units // 10}\n"
            f"tens: {a // 10} + {b // 10} + {units // 10} = {tens}\n"
            f"so {a} + {b} = {a + b}"
        )
        return f"What is {a} + {b}?", str(a + b), steps
    if level == 1:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}"
        return f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}"
    if level == 2:
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 50)
        if rng.random() < 0.5:
            return f"What is {a} * {b} + {c}?", str(a * b + c), f"{a} * {b} = {a * b}, then {a * b} + {c} = {a * b + c}"
        return (
            f"What is ({a} + {b}) * {c}?",
            str((a + b) * c),
            f"{a} + {b} = {a + b}, then {a + b} * {c} = {(a + b) * c}",
        )
    if level == 3:
        x = Fraction(rng.randint(1, 9), rng.randint(2, 9))
        y = Fraction(rng.randint(1, 9), rng.randint(2, 9))
        s = x + y
        q = f"What is {_frac_tex(x)} + {_frac_tex(y)}? Give the answer as a reduced fraction."
        return q, _frac_tex(s), f"common denominator {s.denominator}: {_frac_tex(x)} + {_frac_tex(y)} = {_frac_tex(s)}"
    a, x, b = rng.randint(2, 9), rng.randint(-20, 20), rng.randint(-30, 30)
    c = a * x + b
    q = f"Solve for x: {a}x + {b} = {c}." if b >= 0 else f"Solve for x: {a}x - {-b} = {c}."
    return q, str(x), f"{a}x = {c} - ({b}) = {c - b}, so x = {c - b} / {a} = {x}"


def math_solution(steps: str, answer: str) -> str:
    return f"<think>\n{steps}\n</think>\nThe answer is \\boxed{{{answer}}}."


# Code problem families, each with a parameter k that changes the statement and the answer:
# (statement(k), input generator, reference solution source(k), solver(k, xs)).
_CODE_FAMILIES: list[tuple[Callable, Callable, Callable, Callable]] = [
    (
        lambda k: f"Given integers on one line, print {k} times their sum.",
        lambda r: [r.randint(-100, 100) for _ in range(r.randint(1, 8))],
        lambda k: f"print({k} * sum(map(int, input().split())))",
        lambda k, xs: str(k * sum(xs)),
    ),
    (
        lambda k: f"Given integers on one line, print the largest plus {k}.",
        lambda r: [r.randint(-100, 100) for _ in range(r.randint(1, 8))],
        lambda k: f"print(max(map(int, input().split())) + {k})",
        lambda k, xs: str(max(xs) + k),
    ),
    (
        lambda k: (
            f"Given integers on one line, print the {k} smallest in increasing order, separated by spaces "
            f"(all of them if there are fewer than {k})."
        ),
        lambda r: [r.randint(-50, 50) for _ in range(r.randint(1, 8))],
        lambda k: f"print(*sorted(map(int, input().split()))[:{k}])",
        lambda k, xs: " ".join(map(str, sorted(xs)[:k])),
    ),
    (
        lambda k: f"Given integers on one line, print how many of them are divisible by {k}.",
        lambda r: [r.randint(-100, 100) for _ in range(r.randint(1, 8))],
        lambda k: f"print(sum(1 for x in map(int, input().split()) if x % {k} == 0))",
        lambda k, xs: str(sum(x % k == 0 for x in xs)),
    ),
    (
        lambda k: f"Given a non-negative integer n, print the n-th Fibonacci number modulo {k} (F(0) = 0, F(1) = 1).",
        lambda r: [r.randint(0, 60)],
        lambda k: f"n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a % {k})",
        lambda k, xs: str(_fib(xs[0]) % k),
    ),
    (
        lambda k: f"Given two positive integers, print {k} times their greatest common divisor.",
        lambda r: [r.randint(1, 500), r.randint(1, 500)],
        lambda k: f"import math\na, b = map(int, input().split())\nprint({k} * math.gcd(a, b))",
        lambda k, xs: str(k * _gcd(*xs)),
    ),
]


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def code_problem(rng: random.Random, family: int, n_tests: int = 16) -> tuple[str, dict, str]:
    """``(statement, APPS-style tests, reference solution)`` with ``n_tests`` distinct tests."""
    statement_k, gen, source_k, solve_k = _CODE_FAMILIES[family % len(_CODE_FAMILIES)]
    k = rng.randint(2, 40)
    statement, source = statement_k(k), source_k(k)
    inputs: list[str] = []
    tries = 0
    while len(inputs) < n_tests and tries < 100 * n_tests:
        tries += 1
        line = " ".join(map(str, gen(rng)))
        if line not in inputs:
            inputs.append(line)
    outputs = [solve_k(k, list(map(int, s.split()))) for s in inputs]
    return statement, {"inputs": inputs, "outputs": outputs}, source


def code_solution(statement: str, source: str) -> str:
    return f"<think>\nThe task: {statement} Read the input, compute, print.\n</think>\n```python\n{source}\n```"


def make_math_rows(n: int, seed: int, levels=(1, 2, 3, 4), source: str = "synthetic_math") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        level = levels[i % len(levels)]
        q, ans, steps = math_problem(rng, level)
        rows.append(
            dict(
                data_source=source,
                ability="math",
                prompt=[{"role": "user", "content": f"{MATH_INSTRUCTION}\n\n{q}"}],
                reward_model=dict(style="rule", ground_truth=ans),
                extra_info=dict(index=f"{source}-{seed}-{i}", level=level, solution=math_solution(steps, ans)),
            )
        )
    return rows


def make_code_rows(n: int, seed: int, n_tests: int = 16, source: str = "synthetic_code") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        statement, tests, ref = code_problem(rng, i, n_tests)
        rows.append(
            dict(
                data_source=source,
                ability="code",
                prompt=[{"role": "user", "content": f"{CODE_INSTRUCTION}\n\n{statement}"}],
                reward_model=dict(style="rule", ground_truth=json.dumps(tests)),
                extra_info=dict(
                    index=f"{source}-{seed}-{i}", reference_solution=ref, solution=code_solution(statement, ref)
                ),
            )
        )
    return rows


def sft_conversations(rows: list[dict]) -> list[dict]:
    """SFT rows (``messages``) from RL rows: the prompt and its worked solution."""
    return [{"messages": r["prompt"] + [{"role": "assistant", "content": r["extra_info"]["solution"]}]} for r in rows]


def held_out(train: list[dict], candidates: list[dict], n: int) -> list[dict]:
    """The first ``n`` candidates whose question is not among the training questions (small
    problem spaces, like the demo's two-digit sums, would otherwise repeat them)."""
    seen = {r["prompt"][0]["content"] for r in train}
    return [r for r in candidates if r["prompt"][0]["content"] not in seen][:n]


def make_code_dataset(out: str | Path, n_train: int = 2000, n_test: int = 48, seed: int = 0) -> dict:
    """A code-only data set for the code-reward ablation; returns ``{name: path}``.

    Our code problems are 6 families x 39 constants, so random rows repeat statements: the
    test split takes ``n_test`` distinct statements and the train split never contains one of
    them (the model must carry a constant it has seen elsewhere into a new family). Files:
    ``code_train.parquet``, ``code_test.parquet`` and ``sft.jsonl`` (from the train split).
    """

    def statement(row: dict) -> str:
        return row["prompt"][0]["content"]

    test: dict[str, dict] = {}
    for row in make_code_rows(20 * n_test, seed + 10_000, source="synthetic_code_test"):
        test.setdefault(statement(row), row)
    if len(test) < n_test:
        raise ConfigError(f"only {len(test)} distinct code statements for n_test={n_test}")
    test_rows = list(test.values())[:n_test]
    unseen = {statement(r) for r in test_rows}
    train = [r for r in make_code_rows(2 * n_train, seed) if statement(r) not in unseen][:n_train]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"code_train": out / "code_train.parquet", "code_test": out / "code_test.parquet", "sft": out / "sft.jsonl"}
    write_parquet(train, files["code_train"])
    write_parquet(test_rows, files["code_test"])
    files["sft"].write_text("".join(json.dumps(c) + "\n" for c in sft_conversations(train)))
    return files


def make_dataset(
    out: str | Path,
    seed: int = 0,
    n_math: int = 2000,
    n_code: int = 60,
    n_test: int = 200,
    levels: tuple[int, ...] = (1, 2, 3, 4),
) -> dict:
    """Write the whole synthetic data set; returns ``{name: path}``.

    ``levels`` picks the math difficulty levels (the demo uses level 0 only).

    Files: ``math_train.parquet``, ``math_test.parquet``, ``code_train.parquet``,
    ``code_test.parquet`` (RL schema) and ``sft.jsonl`` (conversations from the train splits).
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    train = make_math_rows(n_math, seed, levels)
    splits = {
        "math_train": train,
        "math_test": held_out(train, make_math_rows(3 * n_test, seed + 10_000, levels, "synthetic_math_test"), n_test),
        "code_train": make_code_rows(n_code, seed),
        "code_test": make_code_rows(max(6, n_test // 20), seed + 10_000, source="synthetic_code_test"),
    }
    for name, rows in splits.items():
        files[name] = out / f"{name}.parquet"
        write_parquet(rows, files[name])
    files["sft"] = out / "sft.jsonl"
    with open(files["sft"], "w") as f:
        for row in sft_conversations(splits["math_train"] + splits["code_train"]):
            f.write(json.dumps(row) + "\n")
    return files


@dataclass
class SyntheticDataConfig:
    """The ``data.synthetic`` section: which of our data sets a config's ``data.generate``
    folder receives when one of its data files is missing. ``mixed``: ``make_dataset`` (math at
    ``levels``, ``n_math`` train rows and ``n_test`` test rows, plus ``n_code`` code problems);
    ``code``: ``make_code_dataset`` (``n_code`` train problems, ``n_test`` held-out statements)."""

    kind: str = "mixed"  # "mixed" (math and code) or "code"
    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # math difficulty levels (0-4)
    n_math: int = 2000  # math training rows
    n_code: int = 60  # code problems
    n_test: int = 200  # held-out test rows (mixed) or statements (code)
    seed: int = 0  # generator seed

    def validate(self, where: str = "data.synthetic") -> None:
        if self.kind not in SYNTHETIC_KINDS:
            raise ConfigError(f"{where}.kind must be one of {SYNTHETIC_KINDS}, got {self.kind!r}")
        if not self.levels or any(lv not in MATH_LEVELS for lv in self.levels):
            raise ConfigError(f"{where}.levels must be a non-empty list of {MATH_LEVELS}, got {self.levels}")
        for name in ("n_math", "n_code", "n_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")


def write_synthetic(out: str | Path, cfg: SyntheticDataConfig) -> dict:
    """Write the data set ``cfg`` describes into ``out``; returns ``{name: path}``."""
    if cfg.kind == "code":
        return make_code_dataset(out, n_train=cfg.n_code, n_test=cfg.n_test, seed=cfg.seed)
    return make_dataset(out, cfg.seed, cfg.n_math, cfg.n_code, cfg.n_test, tuple(cfg.levels))
