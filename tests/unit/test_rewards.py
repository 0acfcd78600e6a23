"""Rewards with the real sandbox and the real math-verify: correct, wrong, hostile and
pathological inputs.

Hostile programs (tests/sandbox_battery.py) run on every working backend twice: in this
process (``self``: root here, so the sandbox switches to pool uids, which these tests give a
window of their own) and as an ordinary user (``user``: a user this module creates, running the
scorer through runuser; skipped, with the reason, where one cannot be created).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from megatron_klear.errors import ConfigError, SandboxError
from megatron_klear.rewards import memlimit
from megatron_klear.rewards import sandbox as sb
from megatron_klear.rewards.batch import RewardItem, score_batch
from megatron_klear.rewards.code import (
    CodeRewardConfig,
    check_sandbox,
    extract_code,
    extract_code_python,
    normalize_tests,
    outputs_match,
    score_code,
)
from megatron_klear.rewards.math import MathRewardConfig, last_boxed, score_math, score_math_lenient
from megatron_klear.rewards.sandbox import available_backends, run_program
from tests import sandbox_battery as battery
from tests.sandbox_battery import ADD, APPS, fenced

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import sandbox_user  # noqa: E402

BACKENDS = available_backends()
needs_sandbox = pytest.mark.skipif(
    not BACKENDS, reason=f"no usable sandbox: {[(b, sb.backend_problem(b)) for b in ('bwrap', 'firejail')]}"
)
IS_ROOT = os.geteuid() == 0


def think(answer: str) -> str:
    return f"<think>let me work it out</think>\nThe answer is \\boxed{{{answer}}}."


# --- this process's sandboxes: a pool-uid window and a temp directory of their own ----------------

_WINDOW = (3_000_000 + (os.getpid() % 5000) * 200, 200)  # outside the production pool [200000, 700000)


_WINDOW_RANGE = [_WINDOW[0], _WINDOW[0] + _WINDOW[1]]


def in_window(uid: int) -> bool:
    return _WINDOW[0] <= uid < _WINDOW[0] + _WINDOW[1]


@pytest.fixture(scope="module", autouse=True)
def own_sandboxes():
    """Sandbox runs of this process use uids and a temp directory no other process uses, so
    that what they leave behind can be told apart on a shared machine."""
    runs = tempfile.mkdtemp(prefix="mk-sbx-runs-")
    os.chmod(runs, 0o755)  # the pool uid (root) reads the program from there
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb, "_UID_BASE", _WINDOW[0])
        mp.setattr(sb, "_UID_SPAN", _WINDOW[1])
        mp.setattr(tempfile, "tempdir", runs)
        yield Path(runs)
    shutil.rmtree(runs, ignore_errors=True)


@pytest.fixture
def clean_machine(own_sandboxes):
    """No sandbox process of ours before or after the test, and no run's files left on the host."""
    assert not battery.processes_of(in_window, set()), "sandbox processes were running before the test"
    yield
    deadline = time.monotonic() + 5
    while battery.processes_of(in_window, set()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not battery.processes_of(in_window, set()), "sandbox processes left running"
    assert not list(own_sandboxes.glob("mk_sandbox_*")), "a run left files on the host"


# --- math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac12"),
        ("1/2", "\\dfrac{1}{2}"),
        ("\\{1,2,3\\}", "\\{3,2,1\\}"),
        ("[0,1)", "[0, 1)"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\sqrt{4}", "2"),
        ("12", "\\boxed{12}"),
    ],
)
def test_math_equivalent_forms(pred, gold):
    r = score_math(think(pred), gold)
    assert (r.score, r.correct, r.reason) == (1.0, True, "correct")


@pytest.mark.parametrize("pred,gold", [("3", "4"), ("\\frac{1}{3}", "0.5"), ("[0,1]", "[0,1)"), ("x+1", "x-1")])
def test_math_wrong_answers(pred, gold):
    r = score_math(think(pred), gold)
    assert (r.score, r.correct, r.reason) == (-1.0, False, "wrong")


def test_math_format_and_extraction():
    assert score_math("The answer is \\boxed{4}", "4").reason == "format"
    assert score_math("</think><think> \\boxed{4}", "4").reason == "format"  # closed before opened
    assert score_math("<think>so</think> the answer is 4", "4").reason == "no_boxed"
    assert score_math("<think>\\boxed{4}</think> no answer after thinking", "4").reason == "no_boxed"
    assert score_math(think("4"), "4", truncated=True).reason == "truncated"
    assert score_math(think("4"), "4", truncated=True, truncated_is_wrong=False).correct
    assert last_boxed("\\boxed{\\frac{a}{\\sqrt{b}}} tail") == "\\frac{a}{\\sqrt{b}}"
    assert last_boxed("\\boxed{1} and \\boxed {2}") == "2"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"  # unbalanced last one: the one before
    r = score_math("<think>x</think> first \\boxed{3} then \\boxed{4}", "4")
    assert r.correct  # last wins
    assert score_math(think("\\frac{\\frac{1}{2}}{2}"), "1/4").correct  # nested braces


def test_math_reward_values_are_configurable():
    assert score_math(think("4"), "4", correct_score=1.0, wrong_score=0.0).score == 1.0
    assert score_math(think("5"), "4", correct_score=1.0, wrong_score=0.0).score == 0.0
    assert score_math("\\boxed{4}", "4", format_score=-0.5).score == -0.5
    assert score_math("\\boxed{4}", "4", format_rule="none").correct


def test_math_public_code_rules():
    """The public math_dapo.py with math-verify: no </think> -0.5 (checked first), no <think>
    -2.0, and the answer is math-verify's reading of the text after </think>: no \\boxed needed."""
    pub = MathRewardConfig(format_rule="public", answer="after_think")
    assert (score_math("<think>so the answer is 4", "4", config=pub).score, "no </think>") == (-0.5, "no </think>")
    assert score_math("no tags at all: 4", "4", config=pub).score == -0.5
    assert score_math("</think> the answer is $4$", "4", config=pub).score == -2.0
    assert score_math("<think>hmm</think> The answer is $\\frac{1}{2}$.", "0.5", config=pub).correct
    assert score_math("<think>hmm</think> so the result is 12", "12", config=pub).correct
    r = score_math("<think>4</think> so the result is 5", "4", config=pub)
    assert (r.score, r.reason) == (-1.0, "wrong")
    assert score_math(think("3"), "3", config=pub).correct  # a boxed answer reads too


def test_math_lenient_score_reads_the_whole_response():
    """Like the public benchmarks/judge_math.py: no format rule, truncation not special."""
    assert score_math_lenient("No tags; the final answer is $\\frac{3}{4}$.", "0.75") == (
        score_math_lenient("<think>x</think> \\boxed{0.75}", "3/4")
    )
    r = score_math_lenient("No tags; the final answer is $\\frac{3}{4}$.", "0.75")
    assert (r.score, r.correct) == (1.0, True)
    assert score_math_lenient("the final answer is 5", "4").score == 0.0


def test_math_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"reward\.math\.answer"):
        MathRewardConfig(answer="anywhere").validate()
    with pytest.raises(ConfigError, match=r"reward\.math\.format_rule"):
        MathRewardConfig(format_rule="strict").validate()
    with pytest.raises(ConfigError, match=r"reward\.math\.timeout_s"):
        MathRewardConfig(timeout_s=0).validate()
    with pytest.raises(ConfigError, match=r"reward\.math\.wrong_score"):
        MathRewardConfig(wrong_score=float("nan")).validate()
    MathRewardConfig().validate()


def test_math_pathological_input_times_out_without_blocking():
    t = time.monotonic()
    r = score_math(think("(x+1)^{20000}-(x-1)^{20000}"), "1", timeout_s=1.5)
    assert (r.correct, r.reason) == (False, "timeout")
    assert time.monotonic() - t < 6
    assert score_math(think("2"), "2").correct  # the replacement worker works


def test_pathological_responses_score_within_the_time_limit():
    """The red team's cases: unbalanced \\boxed{ runs (52 s and 163 s before), 40,000 ```py
    openers (15.8 s before). Extraction is linear now; math-verify runs under its limit."""
    for n in (8000, 16000):
        t = time.monotonic()
        r = score_math("<think>a</think>" + "\\boxed{" * n, "122", timeout_s=2)
        assert r.reason == "no_boxed" and time.monotonic() - t < 1, (n, time.monotonic() - t)
        score_math(think("1"), "1")  # a started worker: time the check, not the worker's imports
        t = time.monotonic()
        r = score_math("<think>a</think>" + "\\boxed{" * n, "122", answer="after_think", timeout_s=2)
        assert not r.correct and time.monotonic() - t < 2 + 1
    for text in ("```py" * 40000, "```py\n" * 40000, "</think>" + "```python\n" * 40000):
        t = time.monotonic()
        extract_code(text), extract_code_python(text)
        assert time.monotonic() - t < 0.5
    t = time.monotonic()
    assert score_code("```py" * 40000, APPS).reason == "no_code" and time.monotonic() - t < 0.5


_OLD_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PUBLIC_FENCE = re.compile(r"</think>.*```python\n(.*?)\n```", re.DOTALL)  # code_r1_compute.py


def _regex_last_fence(r: str):
    blocks = _OLD_FENCE.findall(r[r.rfind("</think>") :] if "</think>" in r else r)
    return blocks[-1][1] if blocks else None


def _quadratic_last_boxed(text: str):
    """Brace matching by a forward scan from each \\boxed (the former implementation)."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed", 0, start)
    return None


def test_linear_extraction_agrees_with_the_regular_expressions():
    """On random token soups, the linear extractors return exactly what the regular expressions
    (and the former brace scan) return."""
    import random

    rng = random.Random(0)
    fence = ["```", "```python\n", "```py", "\n", "a", " ", "</think>", "<think>", "\n```", "python", "`"]
    boxed = ["\\boxed", "{", "}", " ", "x", "\\boxed{", "}}"]
    for _ in range(3000):
        s = "".join(rng.choice(fence) for _ in range(rng.randint(0, 14)))
        assert extract_code(s) == _regex_last_fence(s), s
        m = _PUBLIC_FENCE.search(s)
        assert extract_code_python(s) == (m.group(1) if m else None), s
        b = "".join(rng.choice(boxed) for _ in range(rng.randint(0, 12)))
        assert last_boxed(b) == _quadratic_last_boxed(b), b


def test_rewards_work_from_a_plain_script_without_a_main_guard(tmp_path):
    """The math-verify worker is a `python -m` subprocess: multiprocessing's spawn used to re-run
    such a script in the worker, which died with a bare EOFError. The script also holds over
    1024 open descriptors, as a trainer may: no select() limit in our waits."""
    script = tmp_path / "score.py"
    script.write_text(
        "import os\n"
        "held = [os.open('/dev/null', os.O_RDONLY) for _ in range(1100)]\n"
        "from megatron_klear.rewards.math import score_math\n"
        "from megatron_klear.rewards.code import score_code\n"
        "from megatron_klear.rewards.sandbox import available_backends\n"
        "print(score_math('<think>x</think> so \\\\boxed{\\\\frac12}', '0.5'))\n"
        "print(score_math('<think>x</think> so \\\\boxed{3}', '0.5'))\n"
        "if available_backends():\n"
        "    print(score_code('```python\\nprint(int(input()) + 1)\\n```', {'inputs': ['1'], 'outputs': ['2']}))\n"
    )
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        "RewardResult(score=1.0, correct=True, reason='correct')",
        "RewardResult(score=-1.0, correct=False, reason='wrong')",
    ]
    if BACKENDS:
        assert r.stdout.splitlines()[2] == "RewardResult(score=1.0, correct=True, reason='passed 1/1')"


# --- sandbox ---------------------------------------------------------------------------------


@needs_sandbox
@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_basics(backend, clean_machine):
    r = run_program("import sys; print(sum(map(int, sys.stdin.read().split())))", "1 2 3", backend=backend)
    assert r.ok and r.stdout.strip() == "6" and r.backend == backend
    r = run_program("raise SystemExit(3)", backend=backend)
    assert r.exit_code == 3 and not r.ok
    big = "x" * (3 << 20)  # stdin larger than a pipe buffer, echoed back while it is still being fed
    r = run_program("import sys\nfor line in sys.stdin: sys.stdout.write(line)", big + "\n", backend=backend)
    assert r.ok and r.stdout == big + "\n"
    r = run_program(
        "import os; print(os.environ['HOME'], os.getcwd(), os.path.isdir(os.environ['HOME']))", backend=backend
    )
    home, cwd, exists = r.stdout.split()
    assert home == cwd and exists == "True"  # firejail's HOME used to name a missing directory


def test_no_sandbox_means_refusal(monkeypatch):
    monkeypatch.setattr(sb, "available_backends", lambda: [])
    with pytest.raises(SandboxError, match="refusing to run untrusted code"):
        sb.run_program("print(1)")
    with pytest.raises(ValueError, match="language"):
        sb.run_program("print(1)", language="c", backend="unsafe-local")


def test_unsafe_local_mode_warns(caplog):
    with caplog.at_level("WARNING"):
        r = run_program("print(7)", backend="unsafe-local")
    assert r.stdout.strip() == "7" and "UNSANDBOXED" in caplog.text


@needs_sandbox
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sandbox_that_does_not_start_raises_not_scores(backend, clean_machine, monkeypatch):
    """A sandbox that does not start within START_TIMEOUT_S (1 ms here: no sandbox starts that
    fast) is an error naming the backend, never a failed test; the start-up check reports a
    limit too small for the interpreter (a 1 ms time limit), and otherwise names the backend and
    how each run's memory is limited."""
    with monkeypatch.context() as mp:
        mp.setattr(sb, "START_TIMEOUT_S", 0.001)
        with pytest.raises(SandboxError, match=f"sandbox '{backend}' failed to start \\(no start within"):
            run_program("print(1)", backend=backend)
        with pytest.raises(SandboxError, match=f"sandbox '{backend}' failed to start"):
            score_code(fenced(ADD), APPS, backend=backend)
        res = score_batch([RewardItem("code", fenced(ADD), APPS)], code_config=CodeRewardConfig(backend=backend))
        assert res[0].sandbox_failed
        assert res[0].reason.startswith(f"sandbox_error: sandbox '{backend}' failed to start")
    with pytest.raises(SandboxError, match=f"sandbox '{backend}' check failed: a known-good program"):
        check_sandbox(CodeRewardConfig(timeout_s=0.001, backend=backend))
    line = check_sandbox(CodeRewardConfig(backend=backend))
    assert line == f"{backend}; memory limit per run: {memlimit.mechanism().describe()}"
    with pytest.raises(ValueError, match="memory_mb must be at least 32"):
        run_program("print(1)", memory_mb=8, backend=backend)


def test_the_supervisor_refuses_to_run_without_isolation():
    """Should a backend ever run our command without namespaces (firejail documents such a
    fallback for users it does not allow), the supervisor stops before the program: a failed
    start, not a run. In the host's network namespace, and in the host's PID namespace (where
    killing what a program leaves would reach the host's processes)."""
    net, pid = sb._host_namespaces()
    for host in ([net, "pid:[0]"], ["net:[0]", pid]):
        cmd = ["/bin/sh", "-c", sb._SUPERVISOR, "sh", *host, sys.executable, "-c", "print('ran')"]
        with pytest.raises(SandboxError, match="failed to start.*not isolated: running in a namespace of the host"):
            sb._run(cmd, {"PATH": "/usr/bin:/bin"}, "/", "", "bwrap", True, 10.0, 1024, None)


def test_the_time_limit_counts_from_the_sandbox_start():
    """A slow sandbox start (a loaded machine) is not charged to the program. The "sandbox" here
    is a shell that takes 1 s before it writes the start marker and runs the program (not the
    supervisor: it must not run outside the sandbox's namespaces)."""

    def run(program: str, timeout_s: float):
        slow = ["/bin/sh", "-c", f'sleep 1; echo {sb.START_MARKER.decode().strip()}; exec "$@"', "sh"]
        cmd = slow + [sys.executable, "-c", program]
        return sb._run(cmd, {"PATH": "/usr/bin:/bin"}, "/", "", "bwrap", True, timeout_s, 1024, None)

    r = run("print(42)", 0.5)
    assert r.stdout == "42\n" and not r.timed_out and r.wall_s > 1
    r = run("import time; time.sleep(30)", 0.5)
    assert r.timed_out and 1.5 <= r.wall_s < 5


def test_the_memory_limit_mechanism_is_named_once(monkeypatch, caplog):
    """One INFO line names the mechanism (and, polling, why there is no cgroup); the
    environment variable forces one, and a forced cgroup that cannot be had says why."""
    monkeypatch.setattr(memlimit, "_mechanisms", {})
    monkeypatch.delenv(memlimit.ENV, raising=False)
    with caplog.at_level("INFO", logger=memlimit.__name__):
        m = memlimit.mechanism()
        assert memlimit.mechanism() is m
    lines = [r.getMessage() for r in caplog.records if "sandbox memory limit per run" in r.getMessage()]
    assert lines == [f"sandbox memory limit per run: {m.describe()}"]
    if m.kind == "cgroup":
        assert "cgroup v2" in lines[0] and m.parent.is_dir()
    else:
        assert "polling" in lines[0] and "no cgroup because" in lines[0] and m.why
        monkeypatch.setenv(memlimit.ENV, "cgroup")
        with pytest.raises(SandboxError, match="no cgroup v2 subtree is usable here"):
            memlimit.mechanism()
    monkeypatch.setenv(memlimit.ENV, "poll")
    assert memlimit.mechanism().kind == "poll"
    monkeypatch.setenv(memlimit.ENV, "docker")
    with pytest.raises(SandboxError, match=memlimit.ENV):
        memlimit.mechanism()


@needs_sandbox
@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_the_memory_limit_by_each_mechanism(kind, clean_machine, monkeypatch):
    """Each mechanism that this machine offers, forced, on the default backend: the forked
    children end the run as memory exceeded with the host's peak near the limit, and a cgroup
    run leaves no cgroup behind. (The hostile tests use the default mechanism.)"""
    monkeypatch.setenv(memlimit.ENV, kind)
    try:
        m = memlimit.mechanism()
    except SandboxError as e:
        pytest.skip(str(e))
    ctx = {"uid_range": _WINDOW_RANGE if IS_ROOT else [os.getuid(), os.getuid() + 1]}
    f = battery.forked_children(ctx, BACKENDS[0])
    assert f["memory_exceeded"] and f["score"] == 0.0 and f["run_s"] < 10, (
        f
    )  # ended by the limit, not at the 10 s time limit
    assert battery.MEMORY_MB / 2 <= f["peak_mb"] <= 2 * battery.MEMORY_MB, f
    if m.kind == "cgroup":
        assert not list(m.parent.glob("run-*")), "a run's cgroup was left behind"


def test_code_config_validation_names_the_field():
    for bad, field in [
        (dict(timeout_s=-1.0), "timeout_s"),
        (dict(memory_mb=0), "memory_mb"),
        (dict(memory_mb=16), "memory_mb"),
        (dict(disk_mb=0), "disk_mb"),
        (dict(max_tests=0), "max_tests"),
        (dict(max_sandbox_failures=-1), "max_sandbox_failures"),
        (dict(backend="docker"), "backend"),
        (dict(format_rule="paper"), "format_rule"),
        (dict(fence="java"), "fence"),
        (dict(no_code_score=float("inf")), "no_code_score"),
    ]:
        with pytest.raises(ConfigError, match=rf"reward\.code\.{field}"):
            CodeRewardConfig(**bad).validate()
    with pytest.raises(SandboxError, match="'firejail' cannot run programs here: not installed"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sb, "_problems", {("firejail", os.geteuid()): "not installed: firejail"})
            check_sandbox(CodeRewardConfig(backend="firejail"))


# --- code ------------------------------------------------------------------------------------


@needs_sandbox
def test_code_correct_partial_wrong_crash_slow(clean_machine):
    assert score_code(fenced(ADD), APPS).score == 1.0
    partial = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b if a < 5 else 0)"
    r = score_code(fenced(partial), APPS)
    assert r.score == 0.75 and not r.correct and r.reason == "passed 3/4"
    assert score_code(fenced("print(42)"), APPS).score == 0.0
    assert score_code(fenced("raise RuntimeError('boom')"), APPS).score == 0.0
    slow = "import time, sys\na, b = map(int, sys.stdin.read().split())\nif a == 3: time.sleep(30)\nprint(a + b)"
    r = score_code(fenced(slow), APPS, timeout_s=1.0)
    assert r.score == 0.75  # one slow test costs that test only
    assert score_code(fenced(partial), APPS, binary=True).score == 0.0
    assert score_code(fenced(ADD), APPS, max_tests=2).reason == "passed 2/2"


@needs_sandbox
def test_code_call_based_both_formats(clean_machine):
    sol = (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n"
    )
    lcb = [
        {"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"},
        {"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional"},
    ]
    assert score_code(fenced(sol), lcb, fn_name="twoSum").score == 1.0
    apps = {"fn_name": "area", "inputs": [[2, 3], [1.5, 2]], "outputs": [[6], [3.0]]}
    assert score_code(fenced("def area(w, h):\n    return w * h"), json.dumps(apps)).score == 1.0
    assert score_code(fenced("def area(w, h):\n    return w + h"), apps).score == 0.0
    deep = "def area(w, h):\n    import sys\n    sys.stdout.write('\\n@@MK_RESULT@@' + '[' * 100000)\n    sys.exit(0)"
    assert score_code(fenced(deep), apps).score == 0.0  # output nested past the JSON parser's recursion


def test_code_extraction_and_comparison():
    assert extract_code("```python\na\n```\ntext\n```py\nb\n```") == "b\n"
    assert extract_code("<think>```python\nx\n```</think> no code") is None
    assert outputs_match("1 2\n3.0000001\n\n", "1  2\n3")
    assert not outputs_match("1 2", "1 3") and not outputs_match("1\n2", "1")
    with pytest.raises(ValueError, match="functional tests need fn_name"):
        normalize_tests([{"input": "1", "output": "1", "testtype": "functional"}])
    with pytest.raises(ValueError, match="not valid JSON"):
        normalize_tests("{oops")
    with pytest.raises(ValueError, match="equal length"):
        normalize_tests({"inputs": ["1"], "outputs": []})
    assert score_code("no code here", APPS).reason == "no_code"
    assert score_code(fenced("print(1)"), "{oops").reason.startswith("bad_tests")
    assert score_code(fenced("print(1)"), APPS, truncated=True).reason == "truncated"


@needs_sandbox
def test_code_public_code_rules(clean_machine):
    """code_r1_compute.py's rules as options: think tags, the ```python fence after the first
    </think>, -1 without code, and tests counted +1 / -1."""
    pub = CodeRewardConfig(format_rule="public", fence="python", no_code_score=-1.0, signed=True)
    assert score_code(f"```python\n{ADD}\n```", APPS, config=pub).score == -0.5
    assert score_code(f"</think>```python\n{ADD}\n```", APPS, config=pub).score == -2.0
    assert score_code(f"<think>x</think>```py\n{ADD}\n```", APPS, config=pub).score == -1.0  # not a python fence
    assert score_code(fenced(ADD), APPS, config=pub).score == 1.0
    partial = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b if a < 5 else 0)"
    assert score_code(fenced(partial), APPS, config=pub).score == 0.5  # (3 - 1) / 4
    assert score_code(f"<think>x</think>```py\n{ADD}\n```", APPS).score == 1.0  # today's rule: any fence


# --- hostile programs: each scores 0, finishes within its limit, leaves the host as it was -----


class Host:
    """What a hostile program aims at, on the host: listening sockets (TCP; UNIX sockets: a
    munge-style one under /run, one under /tmp, one in X11's /tmp/.X11-unix; an abstract one),
    a victim file, a secret file, a secret in the scorer's environment. Counts every
    connection it accepts."""

    def __init__(self, owner: int | None):
        tag = uuid.uuid4().hex[:8]
        self.dir = Path(tempfile.mkdtemp(prefix="mk-sbx-host-"))
        self.connections: list[str] = []
        self.servers: list[socket.socket] = []
        tcp = self._serve(socket.AF_INET, ("127.0.0.1", 0), "tcp")
        # Where munge keeps its socket; /tmp when /run is not ours to write.
        self.run_dir = Path("/run" if os.access("/run", os.W_OK) else self.dir) / f"mk-sbx-{tag}"
        self.run_dir.mkdir(mode=0o755)
        # X11's socket directory: firejail's --private-tmp keeps it from the host.
        self.x11_created = not os.path.exists("/tmp/.X11-unix")
        if self.x11_created:
            os.makedirs("/tmp/.X11-unix", exist_ok=True)
            os.chmod("/tmp/.X11-unix", 0o1777)
        unix_paths = [str(self.run_dir / "munge.socket.2"), f"/tmp/mk-sbx-{tag}.sock", f"/tmp/.X11-unix/X{tag}"]
        for p in unix_paths:
            self._serve(socket.AF_UNIX, p, "unix")
            os.chmod(p, 0o777)
        abstract = f"mk-sbx-{tag}"
        self._serve(socket.AF_UNIX, "\0" + abstract, "abstract")
        (self.dir / "victim.txt").write_text("keep me")
        (self.dir / "secret.txt").write_text("s3cr3t")
        if owner is not None:  # the ordinary user owns these: only the sandbox stands in the way
            for p in (self.dir, self.dir / "victim.txt", self.dir / "secret.txt"):
                os.chown(p, owner, -1)
        self.env_name, self.env_secret = "MK_SBX_SECRET", f"env-{tag}"
        self.ctx = {
            "tcp_port": tcp.getsockname()[1],
            "unix_paths": unix_paths,
            "abstract_name": abstract,
            "victim": str(self.dir / "victim.txt"),
            "plant": str(self.dir / "planted.txt"),
            "secret_file": str(self.dir / "secret.txt"),
            "secret_text": "s3cr3t",
            "env_name": self.env_name,
            "daemon_marker": str(self.dir / "daemon_was_here"),
            # whose processes are the sandbox's: the pool uids of this process, or that user
            "uid_range": _WINDOW_RANGE
            if owner is None and IS_ROOT
            else [owner or os.getuid(), (owner or os.getuid()) + 1],
        }

    def _serve(self, family, addr, kind: str) -> socket.socket:
        srv = socket.socket(family)
        srv.bind(addr)
        srv.listen(8)
        srv.settimeout(0.2)
        self.servers.append(srv)

        def accept():
            while srv.fileno() != -1:
                try:
                    conn, _ = srv.accept()
                except (socket.timeout, OSError):
                    continue
                self.connections.append(kind)
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
        return srv

    def assert_untouched(self) -> None:
        assert self.connections == [], f"sandboxed programs reached host sockets: {self.connections}"
        assert (self.dir / "victim.txt").read_text() == "keep me"
        assert not (self.dir / "planted.txt").exists() and not os.path.exists("/etc/mk_planted")
        assert not (self.dir / "daemon_was_here").exists()

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for p in self.ctx["unix_paths"]:
            Path(p).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.x11_created:
            with contextlib.suppress(OSError):  # another Host's socket may still be in it
                os.rmdir("/tmp/.X11-unix")


def _disk_state() -> dict:
    return {p: shutil.disk_usage(p).used for p in ("/", "/dev/shm")}


@pytest.fixture(scope="module")
def host(own_sandboxes):
    h = Host(None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(h.env_name, h.env_secret)
        yield h
    h.close()


@pytest.fixture(scope="module")
def ordinary_user():
    """(name, None) or (None, why there is none)."""
    try:
        with sandbox_user.temporary_user() as name:
            sandbox_user.user_python(name)
            yield name, None
    except sandbox_user.UserUnavailable as e:
        yield None, str(e)


@pytest.fixture(scope="module")
def user_battery(ordinary_user):
    """The whole battery as the ordinary user, once per backend: {backend: {case: facts}}, plus
    the host's state afterwards (its own host targets, owned by that user)."""
    name, why = ordinary_user
    cache: dict = {}

    def run(backend: str) -> dict:
        if name is None:
            pytest.skip(f"no ordinary user for this part: {why}")
        if backend not in cache:
            import pwd

            uid = pwd.getpwnam(name).pw_uid
            h = Host(uid)
            before = _disk_state()
            try:
                r = sandbox_user.python_as(
                    name,
                    ["tests/sandbox_battery.py", backend, json.dumps(h.ctx)],
                    env={h.env_name: h.env_secret},
                    timeout=600,
                )
                assert r.returncode == 0, r.stderr[-2000:]
                facts = json.loads(r.stdout)
                time.sleep(max(0.0, 2.0 - facts["daemon_that_outlives_it"]["wall_s"]))
                h.assert_untouched()
                left_files = [p for p in Path("/tmp").glob("mk_sandbox_*") if p.stat().st_uid == uid]
                cache[backend] = dict(facts=facts, before=before, after=_disk_state(), left_files=left_files)
            finally:
                h.close()
        return cache[backend]

    return run


def hostile(who: str, backend: str, name: str, host: Host, user_battery) -> dict:
    """The case's facts as ``who``; asserts what holds for every hostile program."""
    if who == "self":
        uids = in_window if IS_ROOT else (lambda uid: False)  # as non-root our own processes are ours
        facts = battery.run_case(name, host.ctx, backend, uids, set())
    else:
        run = user_battery(backend)
        assert run["left_files"] == [], run["left_files"]
        facts = run["facts"][name]
    assert facts["wall_s"] < battery.CASES[name][1], facts
    assert facts["left"] == [], f"left running: {facts['left']}"
    if name not in ("positive", "thread_pool_64"):
        assert facts["score"] == 0.0 and not facts["correct"], facts
    return facts


WHO = ["self", "user"]
hostile_params = pytest.mark.parametrize("who", WHO)
on_backends = pytest.mark.parametrize("backend", BACKENDS or ["none"])


@pytest.fixture
def after(host, clean_machine):
    """Checks the host once the test is done: its targets untouched, disk and shared memory
    unchanged at the scale of the attacks (GBs; other jobs share this machine)."""
    before = _disk_state()
    yield
    host.assert_untouched()
    grew = {p: _disk_state()[p] - before[p] for p in before}
    assert all(g < 1 << 30 for g in grew.values()), grew


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_network(who, backend, host, user_battery, after):
    hostile(who, backend, "network", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_host_unix_socket(who, backend, host, user_battery, after):
    """The munge case: socket files the host serves under /run, /tmp and /tmp/.X11-unix."""
    hostile(who, backend, "host_unix_socket", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_abstract_socket(who, backend, host, user_battery, after):
    hostile(who, backend, "abstract_socket", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_files_outside_the_sandbox(who, backend, host, user_battery, after):
    hostile(who, backend, "files_outside", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_reads_a_secret(who, backend, host, user_battery, after):
    hostile(who, backend, "reads_secret", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_reads_the_host_environment(who, backend, host, user_battery, after):
    hostile(who, backend, "host_env", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_fork_bomb(who, backend, host, user_battery, after):
    hostile(who, backend, "fork_bomb", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_memory_bomb(who, backend, host, user_battery, after):
    f = hostile(who, backend, "memory_bomb", host, user_battery)
    assert f["memory_exceeded"] and not f["ok"]


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_forked_children_over_the_memory_limit(who, backend, host, user_battery, after):
    """The red team's case: children that each stay under the limit, together far over it (8 x
    100 MB under 256 MB; 8 x 900 MB took 7.25 GB of host memory under the 1024 MB per-process
    limit before). The run ends as memory exceeded, long before its time limit, and the host
    saw at most twice the limit, where an unlimited run reaches 800 MB. (A cgroup stops it at
    the limit; the poller lets it grow between two polls and while it confirms, on a loaded
    2-core machine by up to 135 MB in our runs: docs/benchmarks.md.)"""
    f = hostile(who, backend, "forked_children", host, user_battery)
    assert f["memory_exceeded"] and not f["ok"] and f["run_s"] < 10, f  # ended by the limit, not at the 10 s time limit
    assert battery.MEMORY_MB / 2 <= f["peak_mb"] <= 2 * battery.MEMORY_MB, f


@needs_sandbox
@hostile_params
@on_backends
def test_a_64_thread_pool_passes(who, backend, host, user_battery, after):
    """Each thread's stack used to count against a per-process address space of the memory
    limit: a program stopped at 14 threads. Not a hostile program: it must score 1.0."""
    f = hostile(who, backend, "thread_pool_64", host, user_battery)
    assert (f["score"], f["correct"], f["small_limit_score"]) == (1.0, True, 1.0), f


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_infinite_loop(who, backend, host, user_battery, after):
    f = hostile(who, backend, "infinite_loop", host, user_battery)
    assert f["timed_out"] and f["run_s"] < 4


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_prints_gigabytes(who, backend, host, user_battery, after):
    f = hostile(who, backend, "prints_gigabytes", host, user_battery)
    assert f["truncated"] and f["kept"] <= 1 << 20 and f["run_s"] < 10


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_kills_its_parent(who, backend, host, user_battery, after):
    f = hostile(who, backend, "kills_its_parent", host, user_battery)
    assert f["next_score"] == 1.0  # and the next program is unaffected


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_sleeps_after_closing_stdout(who, backend, host, user_battery, after):
    hostile(who, backend, "sleeps_after_closing_stdout", host, user_battery)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_daemon_that_outlives_it(who, backend, host, user_battery, after):
    """The run fails (processes left) and ends when the program does, firejail included: it
    used to wait for the daemon, or the time limit."""
    f = hostile(who, backend, "daemon_that_outlives_it", host, user_battery)
    assert f["exit_code"] == sb.LEFT_PROCESSES and f["run_s"] < 1, f
    time.sleep(max(0.0, 2.0 - f["wall_s"]))  # past the daemon's write (host.assert_untouched)


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_fork_bomb_that_exits(who, backend, host, user_battery, after):
    """A bomb that its starter leaves behind ends with the starter: the supervisor's exit code
    (processes left), not the 6 s time limit."""
    f = hostile(who, backend, "fork_bomb_that_exits", host, user_battery)
    assert f["exit_code"] == sb.LEFT_PROCESSES and f["run_s"] < 3, f


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_writes_10_gb(who, backend, host, user_battery, after):
    """Every writable place is a tmpfs of DISK_MB (bwrap) or read-only (firejail): the writes
    end with ENOSPC / EROFS long before 10 GB, and the host's disk and memory do not grow."""
    f = hostile(who, backend, "write_10gb", host, user_battery)
    written = f["written"]
    assert isinstance(written, dict) and set(written) == {"/tmp", "~", ".", "/var/tmp", "/dev/shm"}, written
    assert all(n <= battery.DISK_MB << 20 and err != 0 for n, err in written.values()), written
    assert sum(n for n, _ in written.values()) <= 2 * battery.DISK_MB << 20, written
    if backend == "bwrap":  # a private, capped tmpfs: it fills, then ENOSPC
        assert written["/tmp"][1] == written["/dev/shm"][1] == 28 and written["/tmp"][0] >= 32 << 20, written
    if who == "user":
        run = user_battery(backend)
        assert all(run["after"][p] - run["before"][p] < 1 << 30 for p in run["before"])


@needs_sandbox
@hostile_params
@on_backends
def test_hostile_2_gb_shared_memory(who, backend, host, user_battery, after):
    f = hostile(who, backend, "shm_2gb", host, user_battery)
    assert '"error"' in f["stdout"], f


@needs_sandbox
@hostile_params
@on_backends
def test_positive_control(who, backend, host, user_battery, after):
    f = hostile(who, backend, "positive", host, user_battery)
    assert (f["score"], f["correct"]) == (1.0, True)


@pytest.mark.skipif(not IS_ROOT or not shutil.which("runuser"), reason="switching to uid 65534 needs root")
def test_as_nobody_firejail_refuses_loudly_and_bwrap_scores():
    """The red team's case: as uid 65534 firejail refuses ("user is not allowed"); that used to
    score a correct program 0.0. Now it is an error naming firejail and the reason, and the
    default backend (bwrap, rootless) scores the program 1.0."""
    script = (
        "import json\nfrom megatron_klear.errors import SandboxError\n"
        "from megatron_klear.rewards import sandbox as sb\n"
        "from megatron_klear.rewards.code import score_code\nfrom tests.sandbox_battery import ADD, APPS, fenced\n"
        "out = {'usable': sb.available_backends(), 'default': score_code(fenced(ADD), APPS).score}\n"
        "try:\n    score_code(fenced(ADD), APPS, backend='firejail')\nexcept SandboxError as e:\n"
        "    out['firejail'] = str(e)\nprint(json.dumps(out))\n"
    )
    try:
        r = sandbox_user.python_as("nobody", ["-c", script], timeout=120)
    except sandbox_user.UserUnavailable as e:
        pytest.skip(str(e))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert "firejail" not in out["usable"]
    assert "sandbox backend 'firejail' cannot run programs here" in out["firejail"] and "not allowed" in out["firejail"]
    if "bwrap" in out["usable"]:
        assert out["default"] == 1.0


# --- batch -----------------------------------------------------------------------------------


@needs_sandbox
def test_score_batch_keeps_order_and_survives_everything(clean_machine):
    items = [
        RewardItem("math", think("4"), "4"),
        RewardItem("code", fenced(ADD), APPS),
        RewardItem("math", think("(x+1)^{20000}-(x-1)^{20000}"), "1"),
        RewardItem("math", think("5"), "4"),
        RewardItem("poetry", "roses", "red"),
        RewardItem("code", fenced("while True: pass"), {"inputs": ["1"], "outputs": ["1"]}),
    ]
    # Limits with room for a loaded machine: only the pathological items should reach them.
    res = score_batch(
        items, workers=3, math_config=MathRewardConfig(timeout_s=4.0), code_config=CodeRewardConfig(timeout_s=3.0)
    )
    assert [r.reason for r in res] == [
        "correct",
        "passed 4/4",
        "timeout",
        "wrong",
        "error: DataError: unknown ability 'poetry' (expected 'math' or 'code')",
        "passed 0/1",
    ]
    assert [r.score for r in res] == [1.0, 1.0, -1.0, -1.0, 0.0, 0.0]


def _reward_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("reward")]


@needs_sandbox
def test_a_deadline_leaves_no_work_running(clean_machine):
    """A missed deadline cancels the item: its math-verify worker and its sandbox runs are
    killed, no further test of it starts, and score_batch returns only once all is quiet."""
    from megatron_klear.rewards import math as rmath

    score_math(think("1"), "1")  # a started worker, so the deadline is spent in the check
    t = time.monotonic()
    res = score_batch([RewardItem("math", think("(x+1)^{20000}-(x-1)^{20000}"), "1")], workers=1, deadline_s=0.5)
    assert res[0].reason == "deadline" and not res[0].correct
    assert time.monotonic() - t < 3 and not _reward_threads()  # the check alone would take minutes
    busy = [v for v in rmath._idle if v._proc is not None and v._proc.poll() is None]
    for v in busy:  # the worker that had the pathological check was killed; the others are idle
        assert sb_cpu_idle(v._proc.pid), "a math-verify worker still computes after the deadline"
    loop = {"inputs": ["1"] * 8, "outputs": ["1"] * 8}
    t = time.monotonic()
    res = score_batch(
        [RewardItem("code", fenced("while True: pass"), loop)],
        workers=1,
        code_config=CodeRewardConfig(timeout_s=5),
        deadline_s=0.5,
    )
    assert res[0].reason == "deadline" and time.monotonic() - t < 3 and not _reward_threads()  # not 8 x 5 s
    # Its sandbox was killed (SIGKILL to the group; the PID namespace's init follows its parent):
    # the processes are gone as soon as the kernel has torn them down.
    deadline = time.monotonic() + 2
    while battery.processes_of(in_window, set()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not battery.processes_of(in_window, set()), "the deadline left a sandbox running"


def sb_cpu_idle(pid: int, window_s: float = 0.3) -> bool:
    """True if the process used (almost) no CPU during ``window_s``."""
    import psutil

    p = psutil.Process(pid)
    before = sum(p.cpu_times()[:2])
    time.sleep(window_s)
    return sum(p.cpu_times()[:2]) - before < 0.05


# --- what the RL loop uses: the start-up check, the failure budget, typed configs -------------


def test_sandbox_failure_budget_counts_then_stops():
    from megatron_klear.rewards.batch import SandboxFailureBudget
    from megatron_klear.rewards.types import RewardResult

    fail = RewardResult(0.0, False, "sandbox_error: sandbox 'bwrap' failed to start (exit code 1): bwrap: boom")
    ok = RewardResult(1.0, True, "passed 4/4")
    budget = SandboxFailureBudget(limit=3)
    assert budget.add([ok, ok]) == 0
    assert budget.add([fail, ok, fail]) == 2 and budget.add([fail]) == 1
    with pytest.raises(SandboxError, match=r"4 code rewards could not run.*max_sandbox_failures=3.*bwrap: boom"):
        budget.add([ok, fail])
    with pytest.raises(SandboxError):
        SandboxFailureBudget(limit=0).add([fail])


@needs_sandbox
def test_rl_start_up_check_and_reward_config_errors(clean_machine):
    """The trainer's pieces (not distributed here: broadcast returns the object): code prompts
    make rank 0 check the sandbox before step 1; math-only runs do not touch it; a bad reward
    field is a ConfigError naming it, at load."""
    from megatron_klear.config import load_config
    from megatron_klear.data.rl import RLPrompt
    from megatron_klear.rl.config import RLConfig
    from megatron_klear.rl.trainer import check_code_sandbox

    code = RLPrompt("c0", "synthetic", "code", [{"role": "user", "content": "add"}], json.dumps(APPS))
    math = RLPrompt("m0", "synthetic", "math", [{"role": "user", "content": "2+2"}], "4")
    check_code_sandbox(CodeRewardConfig(), [math, code])
    check_code_sandbox(CodeRewardConfig(timeout_s=0.001), [math])  # no code prompt: no check
    with pytest.raises(SandboxError, match="check failed: a known-good program"):
        check_code_sandbox(CodeRewardConfig(timeout_s=0.001), [math, code])
    yaml = ROOT / "examples" / "tiny" / "rl_code.yaml"
    cfg = load_config(RLConfig, yaml, ["reward.code.fence=python", "reward.math.answer=whole"])
    assert cfg.reward.code.fence == "python" and cfg.reward.math.answer == "whole" and cfg.reward.code.timeout_s == 6.0
    with pytest.raises(ConfigError, match=r"reward\.code\.fence must be one of"):
        load_config(RLConfig, yaml, ["reward.code.fence=java"])
    with pytest.raises(ConfigError, match=r"reward\.math\.timeout_s must be a positive"):
        load_config(RLConfig, yaml, ["reward.math.timeout_s=0"])
    with pytest.raises(ConfigError, match=r"unknown config key reward\.math\.nonsense"):
        load_config(RLConfig, yaml, ["reward.math.nonsense=1"])
