"""Rewards with the real sandbox and the real math-verify: correct, wrong and hostile inputs."""

from __future__ import annotations

import json
import socket
import time

import psutil
import pytest

from megatron_klear.rewards.batch import RewardItem, score_batch
from megatron_klear.rewards.code import extract_code, normalize_tests, outputs_match, score_code
from megatron_klear.rewards.math import last_boxed, score_math
from megatron_klear.rewards.sandbox import _UID_BASE, available_backends, run_program

BACKENDS = available_backends()
needs_sandbox = pytest.mark.skipif(not BACKENDS, reason="no sandbox installed (tools/test.sh installs firejail)")


def think(answer: str) -> str:
    return f"<think>let me work it out</think>\nThe answer is \\boxed{{{answer}}}."


def fenced(code: str) -> str:
    return f"<think>plan</think>\nHere is the program:\n```python\n{code}\n```\n"


def sandbox_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real >= _UID_BASE:
                out.append(p)
        except psutil.Error:
            pass
    return out


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


def test_math_pathological_input_times_out_without_blocking():
    t = time.monotonic()
    r = score_math(think("(x+1)^{20000}-(x-1)^{20000}"), "1", timeout_s=1.5)
    assert (r.correct, r.reason) == (False, "timeout")
    assert time.monotonic() - t < 6
    assert score_math(think("2"), "2").correct  # the replacement worker works


# --- sandbox ---------------------------------------------------------------------------------


@needs_sandbox
@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_basics(backend):
    r = run_program("import sys; print(sum(map(int, sys.stdin.read().split())))", "1 2 3", backend=backend)
    assert r.ok and r.stdout.strip() == "6" and r.backend == backend
    r = run_program("raise SystemExit(3)", backend=backend)
    assert r.exit_code == 3 and not r.ok


def test_no_sandbox_means_refusal(monkeypatch):
    import megatron_klear.rewards.sandbox as sb

    monkeypatch.setattr(sb, "available_backends", lambda: [])
    with pytest.raises(RuntimeError, match="refusing to run untrusted code"):
        sb.run_program("print(1)")
    with pytest.raises(ValueError, match="language"):
        sb.run_program("print(1)", language="c", backend="unsafe-local")


def test_unsafe_local_mode_warns(caplog):
    with caplog.at_level("WARNING"):
        r = run_program("print(7)", backend="unsafe-local")
    assert r.stdout.strip() == "7" and "UNSANDBOXED" in caplog.text


# --- code ------------------------------------------------------------------------------------

ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"
APPS = {"inputs": ["1 2", "3 4", "10 -3", "0 0"], "outputs": ["3", "7", "7", "0"]}


@needs_sandbox
def test_code_correct_partial_wrong_crash_slow():
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
def test_code_call_based_both_formats():
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


# --- hostile programs: each scores 0 and leaves the machine as it was ------------------------


@pytest.fixture(params=BACKENDS or ["none"])
def backend(request):
    return request.param


@pytest.fixture
def clean_machine():
    assert not sandbox_processes(), "sandbox processes were running before the test"
    yield
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandbox_processes(), f"left running: {[p.info for p in sandbox_processes()]}"


def expect_zero(code: str, expected: str, backend: str, **kw):
    r = score_code(fenced(code), {"inputs": [""], "outputs": [expected]}, backend=backend, **kw)
    assert r.score == 0.0 and not r.correct, r
    return r


@needs_sandbox
def test_hostile_network(backend, clean_machine):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.send(b'hi')\nprint('connected')"
    )
    expect_zero(code, "connected", timeout_s=3, backend=backend)
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()


@needs_sandbox
def test_hostile_files_outside_the_sandbox(backend, clean_machine, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    code = (
        f"import os\nos.remove({str(victim)!r})\nopen({str(tmp_path / 'planted.txt')!r}, 'w').write('x')\n"
        "open('/etc/mk_planted', 'w').write('x')\nprint('done')"
    )
    expect_zero(code, "done", backend=backend)
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "planted.txt").exists()
    import os

    assert not os.path.exists("/etc/mk_planted")


@needs_sandbox
def test_hostile_reads_a_secret(backend, clean_machine, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    expect_zero(f"print(open({str(secret)!r}).read())", "s3cr3t", backend=backend)


@needs_sandbox
def test_hostile_fork_bomb(backend, clean_machine):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t = time.monotonic()
    expect_zero(code, "never", timeout_s=2, backend=backend)
    assert time.monotonic() - t < 15


@needs_sandbox
def test_hostile_memory_bomb(backend, clean_machine):
    r = run_program("x = bytearray(8 * 1024**3)\nprint('allocated')", memory_mb=256, backend=backend)
    assert r.memory_exceeded and not r.ok
    expect_zero("x = [0] * (4 * 1024**3)\nprint('allocated')", "allocated", memory_mb=256, backend=backend)


@needs_sandbox
def test_hostile_infinite_loop(backend, clean_machine):
    r = run_program("while True: pass", timeout_s=1, backend=backend)
    assert r.timed_out and r.wall_s < 3
    expect_zero("while True: pass", "x", timeout_s=1, backend=backend)


@needs_sandbox
def test_hostile_prints_gigabytes(backend, clean_machine):
    t = time.monotonic()
    r = run_program(
        "import sys\nwhile True: sys.stdout.write('x' * 65536)", max_output_bytes=1 << 20, timeout_s=20, backend=backend
    )
    assert r.output_truncated and len(r.stdout) <= 1 << 20 and time.monotonic() - t < 10
    expect_zero("import sys\nwhile True: sys.stdout.write('x' * 65536)", "x", backend=backend)


@needs_sandbox
def test_hostile_kills_its_parent(backend, clean_machine):
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint('ok')"
    expect_zero(code, "never", backend=backend)
    assert score_code(fenced(ADD), APPS, backend=backend).score == 1.0  # and the next program is unaffected


@needs_sandbox
def test_hostile_sleeps_after_closing_stdout(backend, clean_machine):
    code = "import os, sys, time\nprint('42')\nsys.stdout.flush()\nos.close(1)\ntime.sleep(60)"
    t = time.monotonic()
    expect_zero(code, "42", timeout_s=1.5, backend=backend)
    assert time.monotonic() - t < 10


@needs_sandbox
def test_hostile_daemon_that_outlives_it(backend, clean_machine, tmp_path):
    marker = tmp_path / "daemon_was_here"
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(2)\n"
        f"        open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nprint('42')"
    )
    expect_zero(code, "42", timeout_s=1, backend=backend)
    time.sleep(2.5)
    assert not marker.exists()


# --- batch -----------------------------------------------------------------------------------


@needs_sandbox
def test_score_batch_keeps_order_and_survives_everything():
    items = [
        RewardItem("math", think("4"), "4"),
        RewardItem("code", fenced(ADD), APPS),
        RewardItem("math", think("(x+1)^{20000}-(x-1)^{20000}"), "1"),
        RewardItem("math", think("5"), "4"),
        RewardItem("poetry", "roses", "red"),
        RewardItem("code", fenced("while True: pass"), APPS),
    ]
    from megatron_klear.rewards.code import CodeRewardConfig
    from megatron_klear.rewards.math import MathRewardConfig

    res = score_batch(
        items, workers=3, math_config=MathRewardConfig(timeout_s=1.5), code_config=CodeRewardConfig(timeout_s=0.5)
    )
    assert [r.reason for r in res] == [
        "correct",
        "passed 4/4",
        "timeout",
        "wrong",
        "error: ValueError: unknown ability 'poetry' (expected 'math' or 'code')",
        "passed 0/4",
    ]
    assert [r.score for r in res] == [1.0, 1.0, -1.0, -1.0, 0.0, 0.0]


def test_score_batch_deadline():
    res = score_batch([RewardItem("math", think("(x+1)^{20000}-(x-1)^{20000}"), "1")], workers=1, deadline_s=0.5)
    assert res[0].reason == "deadline" and not res[0].correct
