#!/usr/bin/env python
"""Reward throughput: math verifications/s per worker, sandbox start-up per backend (as this
user and, when root, as an ordinary user) and what the isolation costs over a bare
interpreter, and code test executions/s with N workers on a realistic mix.

    python tools/bench_rewards.py [--workers 1 2 4] [--runs 40] [--user NAME] [--json bench_rewards.json]

Start-up is the wall time of ``run_program("pass")``: a temporary directory, the run's memory
limit (its cgroup, or the poller's first look; the mechanism is printed and in the JSON), the
sandbox, the supervisor, the interpreter, teardown. The bare interpreter row is the sandbox's interpreter
with the same flags and no sandbox; a backend's isolation overhead is its median minus that. As root, the ordinary-user
figures come from a user created for the run (or ``--user``), running this script with
``--startup-only`` through runuser.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sandbox_user

from megatron_klear.rewards import memlimit
from megatron_klear.rewards.batch import RewardItem, score_batch
from megatron_klear.rewards.math import score_math
from megatron_klear.rewards.sandbox import available_backends, backend_problem, run_program, sandbox_python

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


def _stats(walls: list[float]) -> dict:
    return dict(median_ms=1e3 * statistics.median(walls), p95_ms=1e3 * pct(walls, 0.95))


def _bare_run() -> float:
    t = time.perf_counter()
    subprocess.run([sandbox_python(), "-I", "-S", "-c", "pass"], stdin=subprocess.DEVNULL, capture_output=True)
    return time.perf_counter() - t


def startup(runs: int) -> dict:
    """{backend: {median_ms, p95_ms, overhead_ms}} for every working backend and for the bare
    interpreter (the sandbox's own, same flags, no sandbox); {backend: {"unusable": reason}}
    for the others. The kinds take turns run by run, so that a burst of load on a shared
    machine weighs on all of them alike."""
    kinds = {"bare interpreter": _bare_run}
    out: dict = {}
    for backend in ["bwrap", "firejail"]:
        if backend in available_backends():
            kinds[backend] = functools.partial(lambda b: run_program("pass", backend=b).wall_s, backend)
        else:
            out[backend] = {"unusable": backend_problem(backend)}
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    for run in range(runs + 1):
        for kind, once in kinds.items():
            wall = once()
            if run:  # the first round warms up (the probe, the page cache)
                walls[kind].append(wall)
    out = {**{k: _stats(w) for k, w in walls.items()}, **out}
    bare = out["bare interpreter"]["median_ms"]
    for s in out.values():
        if "median_ms" in s:
            s["overhead_ms"] = s["median_ms"] - bare
    return out


def startup_as_user(runs: int, user: str | None) -> dict:
    """The start-up table measured as an ordinary user, or {"skipped": why}."""
    try:
        with contextlib.ExitStack() as stack:
            name = user or stack.enter_context(sandbox_user.temporary_user("mkbench"))
            r = sandbox_user.python_as(name, ["tools/bench_rewards.py", "--startup-only", "--runs", str(runs)])
            if r.returncode != 0:
                return {"skipped": f"the run as {name} failed: {r.stderr.strip()[-500:]}"}
            return {"user": name, **json.loads(r.stdout)}
    except sandbox_user.UserUnavailable as e:
        return {"skipped": str(e)}


def startup_table(title: str, table: dict) -> None:
    print(f"\n{title}")
    print("| sandbox backend | start-up median (ms) | p95 (ms) | isolation overhead (ms) |\n|---|---:|---:|---:|")
    for b, s in table.items():
        if "median_ms" in s:
            print(f"| {b} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['overhead_ms']:.1f} |")
        else:
            print(f"| {b} | unusable: {s['unusable']} | | |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=40, help="sandbox runs per backend for start-up")
    p.add_argument("--user", default=None, help="an existing ordinary user for the user figures (root only)")
    p.add_argument("--startup-only", action="store_true", help="print the start-up table as JSON and exit")
    p.add_argument("--json", default="bench_rewards.json")
    a = p.parse_args(argv)
    if a.startup_only:
        print(json.dumps({"memory_limit": memlimit.mechanism().describe(), "startup": startup(a.runs)}))
        return 0
    result: dict = {"uid": os.geteuid(), "memory_limit": memlimit.mechanism().describe()}

    score_math(think("1"), "1")  # start the math-verify worker outside the timing
    n = 10 * len(MATH_MIX)
    t = time.perf_counter()
    for i in range(n):
        pred, gold = MATH_MIX[i % len(MATH_MIX)]
        score_math(think(pred), gold)
    result["math_verifications_per_s_per_worker"] = n / (time.perf_counter() - t)

    result["sandbox_startup"] = startup(a.runs)
    result["sandbox_startup_ordinary_user"] = (
        startup_as_user(a.runs, a.user) if os.geteuid() == 0 else {"skipped": "already an ordinary user"}
    )

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
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    startup_table(f"sandbox start-up as {who} ({a.runs} runs each)", result["sandbox_startup"])
    print(f"memory limit per run: {result['memory_limit']}")
    as_user = result["sandbox_startup_ordinary_user"]
    if "startup" in as_user:
        startup_table(f"sandbox start-up as the ordinary user {as_user['user']}", as_user["startup"])
        print(f"memory limit per run: {as_user['memory_limit']}")
    else:
        print(f"\nsandbox start-up as an ordinary user: skipped ({as_user['skipped']})")
    print(f"\ncode mix: {len(mix)} items, {n_tests} test executions")
    print("| workers | seconds | test executions/s |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.2f} | {r['test_executions_per_s']:.1f} |")
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
