"""The public-code presets (examples/qwen3_8b/rl_*_public_code.yaml) load, and their code reward
follows the public KlearReasoner code's rules on hand-computed cases: up to 16 tests drawn at
random per response, stdout compared after ``strip()`` and nothing else, 35 s per test, its
fence, think-tag and +1 / -1 rules; our default stays the soft pass rate."""

from __future__ import annotations

import pytest

from megatron_klear.config import load_config
from megatron_klear.rewards import code as rc
from megatron_klear.rewards.code import CodeRewardConfig, score_code, select_tests
from megatron_klear.rewards.sandbox import available_backends
from megatron_klear.rl.config import RLConfig
from tests.jobs import ROOT

needs_sandbox = pytest.mark.skipif(not available_backends(), reason="no usable sandbox")
ECHO_SUM = "a, b = map(int, input().split())\nprint(a + b)"


def preset(name: str) -> RLConfig:
    return load_config(RLConfig, ROOT / "examples/qwen3_8b" / name, ["model.hf=/m"])


def public(code: str) -> str:
    return f"<think>plan</think>\nThe program:\n```python\n{code}\n```\n"


def test_presets_load_with_the_public_rules():
    code = preset("rl_code_public_code.yaml").reward.code
    assert (code.sample_tests, code.compare, code.timeout_s, code.memory_mb, code.max_procs) == (16, "exact", 35.0,
                                                                                                  1024, 32)  # fmt: skip
    assert (code.fence, code.no_code_score, code.signed, code.format_rule, code.truncated_is_wrong) == (
        "python", -1.0, True, "public", False)  # fmt: skip
    ours = preset("rl_code.yaml").reward.code
    assert (ours.sample_tests, ours.compare, ours.timeout_s, ours.signed) == (None, "tolerant", 6.0, False)
    math = preset("rl_math_public_code.yaml")
    assert math.algo.agg == "token-mean" and math.reward.math.format_rule == "public"
    rl = preset("rl_code_public_code.yaml")
    assert (rl.data.gen_batch_prompts, rl.data.max_gen_batches, rl.algo.filter_metric, rl.algo.adv_std) == (
        256, 1, "acc", "sample")  # fmt: skip


def test_sixteen_tests_drawn_per_response_reproducibly():
    cases = [rc.TestCase("stdin", f"{i} 0", str(i)) for i in range(20)]
    cfg = CodeRewardConfig(sample_tests=16)
    picks = {tuple(c.input for c in select_tests(cases, f"print(1)  # {i}", cfg)) for i in range(8)}
    assert all(len(p) == 16 == len(set(p)) for p in picks) and len(picks) > 1  # other programs, other tests
    assert select_tests(cases, "x", cfg) == select_tests(cases, "x", cfg)  # the same response: the same tests
    assert select_tests(cases[:10], "x", cfg) == cases[:10]  # fewer than 16: every one


@needs_sandbox
def test_public_code_reward_by_hand():
    cfg = preset("rl_code_public_code.yaml").reward.code
    twenty = {"inputs": [f"{i} 1" for i in range(20)], "outputs": [str(i + 1) for i in range(20)]}
    r = score_code(public(ECHO_SUM), twenty, config=cfg)
    assert (r.score, r.correct, r.reason) == (1.0, True, "passed 16/16")
    # passes the tests with a < 10 only: of the 16 drawn, 6 to 10 pass (4 of the failing 10 are left
    # out at most); +1 / -1 each, averaged
    half = "a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)"
    r = score_code(public(half), twenty, config=cfg)
    passed = int(r.reason.split()[1].split("/")[0])
    assert r.reason.endswith("/16") and 6 <= passed <= 10 and r.score == (2 * passed - 16) / 16 and not r.correct
    # exact stdout after strip(): spaces around pass, another spelling of the number does not
    padded, decimal = {"inputs": ["1 2"], "outputs": ["3\n"]}, {"inputs": ["1 2"], "outputs": ["3"]}
    assert score_code(public("input()\nprint('  3  ')"), padded, config=cfg).score == 1.0
    assert score_code(public("input()\nprint('3.0')"), decimal, config=cfg).score == -1.0
    assert score_code(public("input()\nprint('3.0')"), decimal).score == 1.0  # ours: numbers compare as numbers
    assert score_code(public("input()\nprint('1  2')"), {"inputs": ["x"], "outputs": ["1 2"]}, config=cfg).score == -1.0
    # the public fence, no-code and think-tag rules
    assert score_code(f"<think>x</think>```py\n{ECHO_SUM}\n```", twenty, config=cfg).score == -1.0
    assert score_code(f"```python\n{ECHO_SUM}\n```", twenty, config=cfg).score == -0.5
    assert score_code(f"</think>```python\n{ECHO_SUM}\n```", twenty, config=cfg).score == -2.0
    assert score_code(public(ECHO_SUM), twenty, truncated=True, config=cfg).score == 1.0  # cut: scored anyway


@needs_sandbox
def test_public_per_test_time_limit_is_35_seconds():
    """A program that needs 6.5 s passes under the preset's 35 s and fails under our 6 s."""
    slow = public("import time\ntime.sleep(6.5)\nprint(input())")
    tests = {"inputs": ["7"], "outputs": ["7"]}
    assert score_code(slow, tests, config=preset("rl_code_public_code.yaml").reward.code).score == 1.0
    r = score_code(slow, tests, config=preset("rl_code.yaml").reward.code)
    assert r.score == 0.0 and r.reason == "passed 0/1"
