"""Code reward: fraction of test cases passed (soft reward, paper 3.2.4), run in the sandbox.

The program is the last fenced code block after the last ``</think>`` (any language tag).
Test formats:

* LiveCodeBench: a list of ``{"input", "output", "testtype": "stdin" | "functional"}``; for
  ``functional`` tests the function name comes from ``fn_name`` (the problem's metadata) and
  each line of ``input`` is one JSON argument.
* APPS / TACO: ``{"inputs": [...], "outputs": [...], "fn_name"?: ...}``; with ``fn_name`` each
  input is the list of arguments.

Every test runs in its own sandboxed process with its own limits, so one crash or timeout
costs that test only. A sandbox that fails to start raises ``SandboxError``: it is never scored
as a failed test. ``check_sandbox`` runs a known-good and a known-bad program before training.

How outputs compare (``compare``):

* ``tolerant`` (default, RL): non-empty lines of whitespace-split tokens, numbers within 1e-6;
  a call's value likewise (and a one-element expected list matches its element, TACO-style);
* ``livecodebench``: LiveCodeBench's evaluator (``lcb_runner/evaluation/testing_util.py``, read,
  not copied): both outputs stripped and split at newlines, each line stripped; the line counts
  must agree and each line be equal, or else every token equal as a ``Decimal``; a call's value
  must equal the expected one (no tolerance). Every program runs after the imports LiveCodeBench
  puts before it (``LCB_PRELUDE``), and the code is the text between the last two lines that
  hold a fence (``fence=livecodebench``);
* ``exact``: the public KlearReasoner code: ``stdout.strip() == expected.strip()``, a call's
  value equal.

``binary`` stops at the first failed test (as LiveCodeBench does); ``sample_tests`` runs up to N
tests drawn at random per response (the public code's 16), from a generator seeded by the
program's text, so a response always gets the same tests and its reward is reproducible.

The public KlearReasoner code's rules (``code_r1_compute.py``) are options, off by default:
its think-tag rule (no ``</think>``: -0.5, then no ``<think>``: -2.0), its fence rule (the last
```` ```python ```` block after the first ``</think>``), -1 for no code, and tests counted +1 / -1.
Text handling is linear in the response length.
"""

from __future__ import annotations

import json
import math
import random
import threading
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Optional, Union

from megatron_klear.errors import ConfigError, DataError, SandboxError
from megatron_klear.rewards import memlimit
from megatron_klear.rewards.math import check_finite, public_format_failure
from megatron_klear.rewards.sandbox import BACKENDS, MIN_MEMORY_MB, ExecResult, resolve_backend, run_program
from megatron_klear.rewards.types import RewardResult

CODE_FORMAT_RULES = ("none", "public")
FENCE_RULES = ("last", "python", "livecodebench")
COMPARE_RULES = ("tolerant", "livecodebench", "exact")
# What LiveCodeBench's evaluator has imported when a program runs: each module, and its names.
_LCB_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                "statistics", "itertools", "functools", "operator", "io", "sys", "json")  # fmt: skip
LCB_PRELUDE = (
    "".join(f"from {m} import *\n" for m in (*_LCB_MODULES, "builtins", "typing"))
    + "".join(f"import {m}\n" for m in _LCB_MODULES)
    + "sys.setrecursionlimit(50000)\n"
)


@dataclass(frozen=True)
class CodeRewardConfig:
    """Limits of each test run, the sandbox, and how a response is scored."""

    timeout_s: float = 6.0  # per test
    memory_mb: int = 1024  # per test: resident memory of the whole run, all its processes together (>= 32)
    max_output_bytes: int = 1 << 20
    max_tests: Optional[int] = None  # cap on tests run per problem
    backend: Optional[str] = None  # sandbox backend; default: the best working one
    binary: bool = False  # 1.0 only if all tests pass (the ablation baseline)
    disk_mb: int = 64  # each writable tmpfs of a run (bwrap: /tmp with the home, and /dev/shm)
    max_procs: int = 128  # processes and threads of a run
    max_sandbox_failures: int = 16  # RL: stop after this many sandbox failures in a run (0: at the first)
    truncated_is_wrong: bool = True  # False: a response cut at the length limit is scored as any other
    format_rule: str = "none"  # or "public": no </think>, then no <think>, score the two below
    missing_think_end_score: float = -0.5
    missing_think_start_score: float = -2.0
    fence: str = "last"  # "last": last block after the last </think>; "python": the public code's rule
    no_code_score: float = 0.0  # no program in the response (the public code: -1.0)
    signed: bool = False  # a test counts +1 passed, -1 failed, averaged (the public code)
    # how outputs compare: "tolerant" (ours), "livecodebench" (its evaluator), "exact" (the public code)
    compare: str = "tolerant"
    sample_tests: Optional[int] = None  # run up to N tests drawn at random per response (the public code: 16)

    def validate(self, where: str = "reward.code") -> None:
        """Raises ConfigError naming ``<where>.<field>`` (the config loader passes the section's path)."""
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"{where}.timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        for name in ("memory_mb", "max_output_bytes", "disk_mb", "max_procs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
        if self.memory_mb < MIN_MEMORY_MB:
            raise ConfigError(f"{where}.memory_mb must be at least {MIN_MEMORY_MB} (MB), got {self.memory_mb!r}")
        if self.max_tests is not None and (not isinstance(self.max_tests, int) or self.max_tests < 1):
            raise ConfigError(f"{where}.max_tests must be >= 1 or null, got {self.max_tests!r}")
        if not isinstance(self.max_sandbox_failures, int) or self.max_sandbox_failures < 0:
            raise ConfigError(f"{where}.max_sandbox_failures must be >= 0, got {self.max_sandbox_failures!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend must be one of {BACKENDS} or null, got {self.backend!r}")
        if self.format_rule not in CODE_FORMAT_RULES:
            raise ConfigError(f"{where}.format_rule must be one of {CODE_FORMAT_RULES}, got {self.format_rule!r}")
        if self.fence not in FENCE_RULES:
            raise ConfigError(f"{where}.fence must be one of {FENCE_RULES}, got {self.fence!r}")
        if self.compare not in COMPARE_RULES:
            raise ConfigError(f"{where}.compare must be one of {COMPARE_RULES}, got {self.compare!r}")
        if self.sample_tests is not None:
            if isinstance(self.sample_tests, bool) or not isinstance(self.sample_tests, int) or self.sample_tests < 1:
                raise ConfigError(f"{where}.sample_tests must be >= 1 or null, got {self.sample_tests!r}")
            if self.max_tests is not None:
                raise ConfigError(f"set at most one of {where}.max_tests (the first N) and {where}.sample_tests")
        for name in ("missing_think_end_score", "missing_think_start_score", "no_code_score"):
            check_finite(self, name, where)


@dataclass(frozen=True)
class TestCase:
    """One normalised test: stdin text or call arguments, and the expected output."""

    kind: str  # "stdin" or "call"
    input: Any
    output: Any


def extract_code(response: str) -> Optional[str]:
    """The last fenced code block after the last ``</think>`` (any language tag), or None.

    A block opens with ```` ``` ```` and the rest of its line, and closes at the next
    ```` ``` ````. One left-to-right pass of ``str.find``: linear time.
    """
    end = response.rfind("</think>")
    text = response if end == -1 else response[end:]
    last, pos = None, 0
    while True:
        start = text.find("```", pos)
        if start == -1:
            return last
        body = text.find("\n", start + 3)
        if body == -1:
            return last
        close = text.find("```", body + 1)
        if close == -1:
            return last
        last, pos = text[body + 1 : close], close + 3


_PY_OPEN, _PY_CLOSE = "```python\n", "\n```"


def extract_code_python(response: str) -> Optional[str]:
    """The public code's rule: the last block opened by a ```` ```python ```` line after the
    first ``</think>`` and closed by a line starting with ```` ``` ````; None without
    ``</think>`` or such a block. Linear time."""
    think = response.find("</think>")
    if think == -1:
        return None
    last_close = response.rfind(_PY_CLOSE)
    start = response.rfind(_PY_OPEN, think + len("</think>"))
    # The last opener whose body (possibly empty) is followed by a closer somewhere.
    while start != -1 and start + len(_PY_OPEN) > last_close:
        start = response.rfind(_PY_OPEN, think + len("</think>"), start)
    if start == -1:
        return None
    body = start + len(_PY_OPEN)
    return response[body : response.find(_PY_CLOSE, body)]


def extract_code_lcb(response: str) -> Optional[str]:
    """LiveCodeBench's rule: the lines between the last two lines that contain ```` ``` ````
    (anywhere in the response); None with fewer than two such lines."""
    lines = response.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return None
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


_EXTRACT = {"last": extract_code, "python": extract_code_python, "livecodebench": extract_code_lcb}


def normalize_tests(
    tests: Union[str, list, dict], fn_name: Optional[str] = None
) -> tuple[list[TestCase], Optional[str]]:
    """Both test formats (as objects or JSON text) -> ``([TestCase], fn_name)``.

    Raises ValueError naming what is malformed.
    """
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise DataError(f"test cases are not valid JSON: {e}") from e
    cases: list[TestCase] = []
    if isinstance(tests, dict):  # APPS / TACO
        if "inputs" not in tests or "outputs" not in tests:
            raise DataError("APPS-style tests need 'inputs' and 'outputs'")
        ins, outs = tests["inputs"], tests["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise DataError("APPS-style 'inputs' and 'outputs' must be lists of equal length")
        fn_name = tests.get("fn_name") or fn_name
        for i, o in zip(ins, outs):
            if fn_name:
                cases.append(TestCase("call", i if isinstance(i, list) else [i], o))
            else:
                cases.append(TestCase("stdin", _as_text(i), _as_text(o)))
        return cases, fn_name
    if isinstance(tests, list):  # LiveCodeBench
        for k, t in enumerate(tests):
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                raise DataError(f"test {k}: LiveCodeBench-style tests need 'input' and 'output'")
            kind = t.get("testtype", "stdin")
            if kind == "functional":
                if not fn_name:
                    raise DataError("functional tests need fn_name (from the problem's metadata)")
                try:
                    args = [json.loads(line) for line in str(t["input"]).splitlines() if line.strip()]
                    expected = json.loads(t["output"])
                except json.JSONDecodeError as e:
                    raise DataError(f"test {k}: functional input/output is not JSON: {e}") from e
                cases.append(TestCase("call", args, expected))
            elif kind == "stdin":
                cases.append(TestCase("stdin", _as_text(t["input"]), _as_text(t["output"])))
            else:
                raise DataError(f"test {k}: unknown testtype {kind!r}")
        return cases, fn_name
    raise DataError(f"test cases must be a list (LiveCodeBench) or a dict (APPS/TACO), got {type(tests).__name__}")


def _as_text(x: Any) -> str:
    if isinstance(x, list):
        return "\n".join(map(str, x))
    return str(x)


def _tokens_equal(a: str, b: str, rel: float = 1e-6, abs_: float = 1e-6) -> bool:
    if a == b:
        return True
    try:
        fa, fb = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(fa, fb, rel_tol=rel, abs_tol=abs_)


def outputs_match(got: str, expected: str) -> bool:
    """``tolerant``: non-empty lines, whitespace-split tokens, numbers with tolerance."""
    g = [line.split() for line in got.strip().splitlines() if line.strip()]
    e = [line.split() for line in expected.strip().splitlines() if line.strip()]
    if len(g) != len(e):
        return False
    return all(len(x) == len(y) and all(_tokens_equal(p, q) for p, q in zip(x, y)) for x, y in zip(g, e))


def _decimals(line: str) -> Optional[list[Decimal]]:
    try:
        return [Decimal(tok) for tok in line.split()]
    except (InvalidOperation, ValueError):
        return None


def outputs_match_lcb(got: str, expected: str) -> bool:
    """``livecodebench``: stripped lines (empty ones inside count), equal text or equal
    ``Decimal`` tokens per line (so ``1.0`` equals ``1``, with no tolerance)."""
    g = [line.strip() for line in got.strip().split("\n")]
    e = [line.strip() for line in expected.strip().split("\n")]
    if len(g) != len(e):
        return False
    for x, y in zip(g, e):
        if x == y:
            continue
        dx, dy = _decimals(x), _decimals(y)
        if dx is None or dy is None or dx != dy:
            return False
    return True


def stdout_matches(got: str, expected: str, compare: str = "tolerant") -> bool:
    """Whether a program's stdout is the expected output under rule ``compare``."""
    if compare == "exact":
        return got.strip() == expected.strip()
    if compare == "livecodebench":
        return outputs_match_lcb(got, expected)
    return outputs_match(got, expected)


def _values_equal(got: Any, expected: Any) -> bool:
    if isinstance(got, float) or isinstance(expected, float):
        try:
            return math.isclose(float(got), float(expected), rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(_values_equal(a, b) for a, b in zip(got, expected))
    return got == expected


_CALL_HARNESS = """

import json as _mk_json, sys as _mk_sys
_mk_args = _mk_json.loads(_mk_sys.stdin.read())
if isinstance(globals().get("Solution"), type) and hasattr(Solution, {fn!r}):  # LeetCode's class first
    _mk_fn = getattr(Solution(), {fn!r})
else:
    _mk_fn = globals().get({fn!r})
_mk_sys.stdout.write("\\n@@MK_RESULT@@" + _mk_json.dumps(_mk_fn(*_mk_args)))
"""


def run_case(
    code: str, case: TestCase, fn_name: Optional[str], cfg: CodeRewardConfig, cancel: Optional[threading.Event] = None
) -> tuple[bool, ExecResult]:
    """Run one test in the sandbox: (passed, what the run did). Raises SandboxError."""
    kw = dict(
        timeout_s=cfg.timeout_s,
        memory_mb=cfg.memory_mb,
        max_output_bytes=cfg.max_output_bytes,
        backend=cfg.backend,
        max_procs=cfg.max_procs,
        disk_mb=cfg.disk_mb,
        cancel=cancel,
    )
    if cfg.compare == "livecodebench":
        code = LCB_PRELUDE + code
    if case.kind == "stdin":
        r = run_program(code, case.input, **kw)
        return r.ok and stdout_matches(r.stdout, case.output, cfg.compare), r
    r = run_program(code + _CALL_HARNESS.format(fn=fn_name), json.dumps(case.input), **kw)
    if not r.ok or "@@MK_RESULT@@" not in r.stdout:
        return False, r
    expected = case.output
    try:
        got = json.loads(r.stdout.rsplit("@@MK_RESULT@@", 1)[1])
        if cfg.compare != "tolerant":  # the value itself (tuples came back as lists, as LiveCodeBench makes them)
            return got == expected, r
        ok = _values_equal(got, expected) or (
            isinstance(expected, list) and len(expected) == 1 and _values_equal(got, expected[0])
        )
    except (ValueError, RecursionError):  # the program's output: not JSON, or nested to no end
        return False, r
    return ok, r


def run_test(
    code: str, case: TestCase, fn_name: Optional[str], cfg: CodeRewardConfig, cancel: Optional[threading.Event] = None
) -> bool:
    """Run one test in the sandbox; True if it passed. Raises SandboxError."""
    return run_case(code, case, fn_name, cfg, cancel)[0]


def score_code(
    response: str,
    tests: Union[str, list, dict],
    *,
    fn_name: Optional[str] = None,
    truncated: bool = False,
    config: Optional[CodeRewardConfig] = None,
    cancel: Optional[threading.Event] = None,
    **cfg,
) -> RewardResult:
    """Score = fraction of tests passed; ``correct`` = all passed.

    Never raises on model output; raises SandboxError when the sandbox cannot run programs
    (a failed start is never a failed test). ``cancel``: when set, the running test is killed
    and no further test starts (reason ``cancelled``).
    """
    c = config or CodeRewardConfig(**cfg)
    if truncated and c.truncated_is_wrong:
        return RewardResult(0.0, False, "truncated")
    if c.format_rule == "public":
        failed = public_format_failure(response, c.missing_think_end_score, c.missing_think_start_score)
        if failed is not None:
            return failed
    code = _EXTRACT[c.fence](response)
    if code is None:
        return RewardResult(c.no_code_score, False, "no_code")
    try:
        cases, fn = normalize_tests(tests, fn_name)
    except ValueError as e:
        return RewardResult(0.0, False, f"bad_tests: {e}")
    cases = select_tests(cases, code, c)
    if not cases:
        return RewardResult(0.0, False, "no_tests")
    passed = 0
    for i, case in enumerate(cases):
        if cancel is not None and cancel.is_set():
            return RewardResult(0.0, False, "cancelled")
        ok = run_test(code, case, fn, c, cancel)
        passed += ok
        if c.binary and not ok:  # solved only if all pass: the rest cannot change the score
            return RewardResult(-1.0 if c.signed else 0.0, False, f"failed test {i + 1} of {len(cases)}")
    all_ok = passed == len(cases)
    score = (1.0 if all_ok else 0.0) if c.binary else passed / len(cases)
    if c.signed:
        score = 2.0 * score - 1.0
    return RewardResult(score, all_ok, f"passed {passed}/{len(cases)}")


def select_tests(cases: list[TestCase], code: str, cfg: CodeRewardConfig) -> list[TestCase]:
    """The tests a response runs: all, the first ``max_tests``, or ``sample_tests`` drawn at
    random (in their original order) with a generator seeded by ``code``."""
    if cfg.max_tests is not None:
        return cases[: cfg.max_tests]
    if cfg.sample_tests is not None and len(cases) > cfg.sample_tests:
        rng = random.Random(zlib.crc32(code.encode("utf-8", "surrogatepass")))
        return [cases[i] for i in sorted(rng.sample(range(len(cases)), cfg.sample_tests))]
    return cases


# Start-up check: a program that must pass and one that must fail, stdin and call-based.
_CHECKS = (  # (test, known-good program, known-bad program)
    (TestCase("stdin", "2 3", "5"), "import sys\nprint(sum(map(int, sys.stdin.read().split())))", "print(-1)"),
    (TestCase("call", [40, 2], 42), "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"),
)


def check_sandbox(cfg: CodeRewardConfig) -> str:
    """Run a known-good and a known-bad program through the sandbox with ``cfg``'s limits;
    return one line naming the backend and how each run's memory is limited.

    Raises SandboxError naming the backend and the reason when no sandbox works, when one does
    not start, or when it judges either program wrongly (e.g. ``timeout_s`` too short for the
    interpreter to start). About four sandbox runs.
    """
    cfg.validate()
    backend = resolve_backend(cfg.backend)
    for case, good, bad in _CHECKS:
        fn = "add" if case.kind == "call" else None
        ok, r = run_case(good, case, fn, cfg)
        if not ok:
            raise SandboxError(
                f"sandbox {backend!r} check failed: a known-good program ({case.kind} test) was judged wrong: "
                f"exit code {r.exit_code}, timed out {r.timed_out}, stderr {r.stderr.strip()[-300:]!r}"
            )
        ok, r = run_case(bad, case, fn, cfg)
        if ok:
            raise SandboxError(f"sandbox {backend!r} check failed: a known-bad program ({case.kind} test) passed")
    return f"{backend}; memory limit per run: {memlimit.mechanism().describe()}"
