#!/usr/bin/env python
"""Reward throughput: math verifications/s per worker, sandbox start-up overhead per backend,
and code test executions/s with N workers on a realistic mix.

    python tools/bench_rewards.py [--workers 1 2 4] [--json bench_rewards.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.rewards.batch import RewardItem, score_batch
from megatron_klear.rewards.math import score_math
from megatron_klear.rewards.sandbox import available_backends, run_program

MATH_MIX = [
    ("\\frac{1}{2}", "0.5"),
    ("3", "4"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("17", "17"),
    ("[0,1)", "[0,1]"),
    ("2\\pi", "6.283185307"),
]
ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"
SORT = "import sys\nxs = sorted(map(int, sys.stdin.read().split()))\nprint(*xs)"


def think(a: str) -> str:
    return f"<think>work</think> \\boxed{{{a}}}"


def fenced(code: str) -> str:
    return f"<think>plan</think>\n```python\n{code}\n```"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=40, help="sandbox runs per backend for start-up overhead")
    p.add_argument("--json", default="bench_rewards.json")
    a = p.parse_args(argv)
    result: dict = {}

    score_math(think("1"), "1")  # start the math-verify worker outside the timing
    n = 10 * len(MATH_MIX)
    t = time.perf_counter()
    for i in range(n):
        pred, gold = MATH_MIX[i % len(MATH_MIX)]
        score_math(think(pred), gold)
    result["math_verifications_per_s_per_worker"] = n / (time.perf_counter() - t)

    startup = {}
    for backend in available_backends() + ["unsafe-local"]:
        walls = [run_program("pass", backend=backend).wall_s for _ in range(a.runs)]
        startup[backend] = dict(median_ms=1e3 * statistics.median(walls), p95_ms=1e3 * pct(walls, 0.95))
    result["sandbox_startup"] = startup

    tests16 = {"inputs": [f"{i} {2 * i}" for i in range(16)], "outputs": [str(3 * i) for i in range(16)]}
    sort16 = {
        "inputs": [" ".join(map(str, range(i, 0, -1))) for i in range(1, 17)],
        "outputs": [" ".join(map(str, range(1, i + 1))) for i in range(1, 17)],
    }
    mix = [
        RewardItem("code", fenced(ADD), tests16),
        RewardItem("code", fenced(SORT), sort16),
        RewardItem("code", fenced("print(0)"), tests16),
        RewardItem("math", think("1/2"), "0.5"),
    ] * 3
    n_tests = sum(16 for it in mix if it.ability == "code")
    rows = []
    for w in a.workers:
        t = time.perf_counter()
        score_batch(mix, workers=w)
        secs = time.perf_counter() - t
        rows.append(dict(workers=w, seconds=secs, test_executions_per_s=n_tests / secs))
    result["code_mix"] = dict(items=len(mix), test_executions=n_tests, rows=rows)

    print(f"math: {result['math_verifications_per_s_per_worker']:.1f} verifications/s per worker")
    print("\n| sandbox backend | start-up median (ms) | p95 (ms) |\n|---|---:|---:|")
    for b, s in startup.items():
        print(f"| {b} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} |")
    print(f"\ncode mix: {len(mix)} items, {n_tests} test executions")
    print("| workers | seconds | test executions/s |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.2f} | {r['test_executions_per_s']:.1f} |")
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
