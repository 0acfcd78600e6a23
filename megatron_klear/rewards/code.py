"""Code reward: fraction of test cases passed (soft reward, paper 3.2.4), run in the sandbox.

The program is the last fenced code block of the response. Test formats:

* LiveCodeBench: a list of ``{"input", "output", "testtype": "stdin" | "functional"}``; for
  ``functional`` tests the function name comes from ``fn_name`` (the problem's metadata) and
  each line of ``input`` is one JSON argument.
* APPS / TACO: ``{"inputs": [...], "outputs": [...], "fn_name"?: ...}``; with ``fn_name`` each
  input is the list of arguments.

Every test runs in its own sandboxed process with its own limits, so one crash or timeout
costs that test only. Outputs compare as LiveCodeBench does: line by line, whitespace-
insensitive, numbers with a tolerance.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from megatron_klear.rewards.sandbox import run_program
from megatron_klear.rewards.types import RewardResult

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeRewardConfig:
    timeout_s: float = 6.0  # per test
    memory_mb: int = 1024  # per test
    max_output_bytes: int = 1 << 20
    max_tests: Optional[int] = None  # cap on tests run per problem
    backend: Optional[str] = None  # sandbox backend; default: best installed
    binary: bool = False  # 1.0 only if all tests pass (the ablation baseline)


@dataclass(frozen=True)
class TestCase:
    """One normalised test: stdin text or call arguments, and the expected output."""

    kind: str  # "stdin" or "call"
    input: Any
    output: Any


def extract_code(response: str) -> Optional[str]:
    """The last fenced code block (after ``</think>`` when there is one), or None."""
    tail = response[response.rfind("</think>") :] if "</think>" in response else response
    blocks = _FENCE.findall(tail)
    return blocks[-1][1] if blocks else None


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
            raise ValueError(f"test cases are not valid JSON: {e}") from e
    cases: list[TestCase] = []
    if isinstance(tests, dict):  # APPS / TACO
        if "inputs" not in tests or "outputs" not in tests:
            raise ValueError("APPS-style tests need 'inputs' and 'outputs'")
        ins, outs = tests["inputs"], tests["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError("APPS-style 'inputs' and 'outputs' must be lists of equal length")
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
                raise ValueError(f"test {k}: LiveCodeBench-style tests need 'input' and 'output'")
            kind = t.get("testtype", "stdin")
            if kind == "functional":
                if not fn_name:
                    raise ValueError("functional tests need fn_name (from the problem's metadata)")
                try:
                    args = [json.loads(line) for line in str(t["input"]).splitlines() if line.strip()]
                    expected = json.loads(t["output"])
                except json.JSONDecodeError as e:
                    raise ValueError(f"test {k}: functional input/output is not JSON: {e}") from e
                cases.append(TestCase("call", args, expected))
            elif kind == "stdin":
                cases.append(TestCase("stdin", _as_text(t["input"]), _as_text(t["output"])))
            else:
                raise ValueError(f"test {k}: unknown testtype {kind!r}")
        return cases, fn_name
    raise ValueError(f"test cases must be a list (LiveCodeBench) or a dict (APPS/TACO), got {type(tests).__name__}")


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
    """LiveCodeBench-style: non-empty lines, whitespace-split tokens, numbers with tolerance."""
    g = [line.split() for line in got.strip().splitlines() if line.strip()]
    e = [line.split() for line in expected.strip().splitlines() if line.strip()]
    if len(g) != len(e):
        return False
    return all(len(x) == len(y) and all(_tokens_equal(p, q) for p, q in zip(x, y)) for x, y in zip(g, e))


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
_mk_fn = globals().get({fn!r})
if _mk_fn is None and "Solution" in globals():
    _mk_fn = getattr(Solution(), {fn!r})
_mk_sys.stdout.write("\\n@@MK_RESULT@@" + _mk_json.dumps(_mk_fn(*_mk_args)))
"""


def run_test(code: str, case: TestCase, fn_name: Optional[str], cfg: CodeRewardConfig) -> bool:
    """Run one test in the sandbox; True if it passed."""
    kw = dict(
        timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_output_bytes=cfg.max_output_bytes, backend=cfg.backend
    )
    if case.kind == "stdin":
        r = run_program(code, case.input, **kw)
        return r.ok and outputs_match(r.stdout, case.output)
    r = run_program(code + _CALL_HARNESS.format(fn=fn_name), json.dumps(case.input), **kw)
    if not r.ok or "@@MK_RESULT@@" not in r.stdout:
        return False
    try:
        got = json.loads(r.stdout.rsplit("@@MK_RESULT@@", 1)[1])
    except json.JSONDecodeError:
        return False
    expected = case.output
    return _values_equal(got, expected) or (
        isinstance(expected, list) and len(expected) == 1 and _values_equal(got, expected[0])
    )


def score_code(
    response: str,
    tests: Union[str, list, dict],
    *,
    fn_name: Optional[str] = None,
    truncated: bool = False,
    config: Optional[CodeRewardConfig] = None,
    **cfg,
) -> RewardResult:
    """Score = fraction of tests passed; ``correct`` = all passed. Never raises on model output."""
    c = config or CodeRewardConfig(**cfg)
    if truncated:
        return RewardResult(0.0, False, "truncated")
    code = extract_code(response)
    if code is None:
        return RewardResult(0.0, False, "no_code")
    try:
        cases, fn = normalize_tests(tests, fn_name)
    except ValueError as e:
        return RewardResult(0.0, False, f"bad_tests: {e}")
    if c.max_tests is not None:
        cases = cases[: c.max_tests]
    if not cases:
        return RewardResult(0.0, False, "no_tests")
    passed = sum(run_test(code, case, fn, c) for case in cases)
    frac = passed / len(cases)
    all_ok = passed == len(cases)
    score = (1.0 if all_ok else 0.0) if c.binary else frac
    return RewardResult(score, all_ok, f"passed {passed}/{len(cases)}")
