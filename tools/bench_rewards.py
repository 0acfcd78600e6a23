#!/usr/bin/env python
"""Reward throughput: math verifications/s per worker, sandbox start-up per backend (as this
user and, when root, as an ordinary user) and what the isolation costs over a bare
interpreter, and code test executions/s with N workers on a realistic mix.

    python tools/bench_rewards.py [--workers 1 2 4] [--runs 40] [--user NAME] [--baseline DIR]
                                  [--json bench_rewards.json]

Start-up is the wall time of a whole ``run_program("pass")`` call: a temporary directory, the
run's memory limit (its cgroup, or the poller's snapshot and polls; the mechanism is printed
and in the JSON), the sandbox, the supervisor, the interpreter, teardown. The bare interpreter
row is the sandbox's interpreter with the same flags and no sandbox; a backend's isolation
overhead is its median minus that. As root, the ordinary-user figures come from a user created
for the run (or ``--user``), running this script with ``--sandbox-only`` through runuser.
``--baseline DIR``: another checkout's sandbox (e.g. the main branch) takes turns with this
one, run by run, as rows "<backend> (baseline)": what a change costs, measured under the same
load (its sandbox.py may import only what this tree has). The JSON has the load average before
and after.

Memory limit: ``FORKED_CHILDREN`` (8 children of 100 MB) under a 256 MB limit for the whole
run, ``--memory-runs`` times per backend: whether each run ended as memory exceeded, how long it
took, and the host's peak (``HostPeak``: the run's processes sampled from /proc every 2 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
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
from megatron_klear.rewards import sandbox as sb
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


def _timed(run, backend: str) -> float:
    """The wall time of one whole ``run("pass", backend=backend)`` call."""
    t = time.perf_counter()
    run("pass", backend=backend)
    return time.perf_counter() - t


def _baseline(tree: str):
    """``tree``'s megatron_klear/rewards/sandbox.py, loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_sandbox", Path(tree) / "megatron_klear/rewards/sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def startup(runs: int, baseline: str | None = None) -> dict:
    """{backend: {median_ms, p95_ms, overhead_ms}} for every working backend and for the bare
    interpreter (the sandbox's own, same flags, no sandbox), and "<backend> (baseline)" rows
    for ``baseline``'s sandbox; {backend: {"unusable": reason}} for the others. The kinds take
    turns run by run, so that a burst of load on a shared machine weighs on all of them alike."""
    kinds = {"bare interpreter": _bare_run}
    base = _baseline(baseline) if baseline else None
    out: dict = {}
    for backend in ["bwrap", "firejail"]:
        if backend in available_backends():
            kinds[backend] = functools.partial(_timed, run_program, backend)
            if base is not None:
                kinds[f"{backend} (baseline)"] = functools.partial(_timed, base.run_program, backend)
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


MEMORY_MB = 256


def memory_limit(runs: int) -> dict:
    """{backend: {exceeded, wall_s, peak_mb}}: FORKED_CHILDREN under MEMORY_MB, ``runs`` times."""
    if os.geteuid() == 0:  # pool uids of our own: no other sandbox on the machine counts
        sb._UID_BASE, sb._UID_SPAN = 3_500_000 + (os.getpid() % 1000) * 100, 100
        uids = (sb._UID_BASE, sb._UID_BASE + sb._UID_SPAN)
    else:
        uids = (os.geteuid(), os.geteuid() + 1)
    out = {}
    for backend in available_backends():
        rows = []
        for _ in range(runs):
            peak = sandbox_user.HostPeak(uids)
            try:
                r = run_program(sandbox_user.FORKED_CHILDREN, memory_mb=MEMORY_MB, backend=backend, timeout_s=10)
            finally:
                peak_mb = peak.stop_mb()
            rows.append((r.memory_exceeded, r.wall_s, peak_mb))
        out[backend] = {k: [row[i] for row in rows] for i, k in enumerate(("exceeded", "wall_s", "peak_mb"))}
    return out


def sandbox_figures(runs: int, baseline: str | None, memory_runs: int) -> dict:
    """This user's start-up table, memory-limit figures and mechanism."""
    return {
        "memory_limit": memlimit.mechanism().describe(),
        "startup": startup(runs, baseline),
        "memory": memory_limit(memory_runs),
    }


def sandbox_figures_as_user(a: argparse.Namespace) -> dict:
    """``sandbox_figures`` as an ordinary user, or {"skipped": why}."""
    if os.geteuid() != 0:
        return {"skipped": "already an ordinary user"}
    try:
        with contextlib.ExitStack() as stack:
            name = a.user or stack.enter_context(sandbox_user.temporary_user("mkbench"))
            args = ["--sandbox-only", "--runs", str(a.runs), "--memory-runs", str(a.memory_runs)]
            args += ["--baseline", a.baseline] if a.baseline else []
            r = sandbox_user.python_as(name, ["tools/bench_rewards.py", *args])
            if r.returncode != 0:
                return {"skipped": f"the run as {name} failed: {r.stderr.strip()[-500:]}"}
            return {"user": name, **json.loads(r.stdout)}
    except sandbox_user.UserUnavailable as e:
        return {"skipped": str(e)}


def sandbox_tables(who: str, figures: dict, runs: int) -> None:
    if "skipped" in figures:
        print(f"\nsandbox as {who}: skipped ({figures['skipped']})")
        return
    print(f"\nsandbox start-up as {who} ({runs} runs each)")
    print("| sandbox backend | start-up median (ms) | p95 (ms) | isolation overhead (ms) |\n|---|---:|---:|---:|")
    for b, s in figures["startup"].items():
        if "median_ms" in s:
            print(f"| {b} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['overhead_ms']:.1f} |")
        else:
            print(f"| {b} | unusable: {s['unusable']} | | |")
    print(f"memory limit per run: {figures['memory_limit']}")
    print(f"8 children of 100 MB under {MEMORY_MB} MB for the whole run, as {who}:")
    print("| sandbox backend | ended as memory exceeded | wall s (each run) | host peak MB (each run) |")
    print("|---|---|---|---|")
    for b, m in figures["memory"].items():
        walls, peaks = ", ".join(f"{w:.2f}" for w in m["wall_s"]), ", ".join(f"{p:.0f}" for p in m["peak_mb"])
        print(f"| {b} | {sum(m['exceeded'])} of {len(m['exceeded'])} | {walls} | {peaks} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=40, help="sandbox runs per backend for start-up")
    p.add_argument("--user", default=None, help="an existing ordinary user for the user figures (root only)")
    p.add_argument("--memory-runs", type=int, default=3, help="memory-limit runs per backend")
    p.add_argument("--sandbox-only", action="store_true", help="print the sandbox figures as JSON and exit")
    p.add_argument("--baseline", default=None, help="another checkout whose sandbox takes turns with this one")
    p.add_argument("--json", default="bench_rewards.json")
    a = p.parse_args(argv)
    if a.sandbox_only:
        print(json.dumps(sandbox_figures(a.runs, a.baseline, a.memory_runs)))
        return 0
    result: dict = {"uid": os.geteuid()}

    score_math(think("1"), "1")  # start the math-verify worker outside the timing
    n = 10 * len(MATH_MIX)
    t = time.perf_counter()
    for i in range(n):
        pred, gold = MATH_MIX[i % len(MATH_MIX)]
        score_math(think(pred), gold)
    result["math_verifications_per_s_per_worker"] = n / (time.perf_counter() - t)

    result["load_average_before"] = os.getloadavg()
    result["sandbox"] = sandbox_figures(a.runs, a.baseline, a.memory_runs)
    result["sandbox_ordinary_user"] = sandbox_figures_as_user(a)
    result["load_average_after"] = os.getloadavg()

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
    sandbox_tables("root" if os.geteuid() == 0 else f"uid {os.geteuid()}", result["sandbox"], a.runs)
    as_user = result["sandbox_ordinary_user"]
    sandbox_tables(f"the ordinary user {as_user.get('user', '')}".strip(), as_user, a.runs)
    print(f"\ncode mix: {len(mix)} items, {n_tests} test executions")
    print("| workers | seconds | test executions/s |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.2f} | {r['test_executions_per_s']:.1f} |")
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
