"""Score many responses at once for the RL loop: parallel, ordered, never stalls.

The heavy work of every item already runs in a child process with a hard kill (the
math-verify worker, the code sandbox), so items are dispatched by a pool of threads. Every
item gets a result: an exception or a missed deadline scores as wrong with a reason that says
so (the loop counts them). A missed deadline cancels the item: its sandbox run or math check
is killed within ~50 ms and no further test of it starts, and ``score_batch`` returns only
once every item's work has stopped. A sandbox that cannot run programs gives the reason
``sandbox_error: ...`` (``RewardResult.sandbox_failed``): not a wrong answer; the RL loop
counts those and stops after ``reward.code.max_sandbox_failures``.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from megatron_klear.errors import DataError, SandboxError
from megatron_klear.rewards.code import CodeRewardConfig, score_code
from megatron_klear.rewards.math import MathRewardConfig, score_math
from megatron_klear.rewards.types import SANDBOX_FAILURE, RewardResult


@dataclass(frozen=True)
class RewardItem:
    """One response to score. ``ground_truth``: the answer (math) or the tests (code)."""

    ability: str  # "math" or "code"
    response: str
    ground_truth: Any
    truncated: bool = False
    fn_name: Optional[str] = None


def score_item(
    item: RewardItem,
    math_cfg: MathRewardConfig,
    code_cfg: CodeRewardConfig,
    cancel: Optional[threading.Event] = None,
) -> RewardResult:
    """One item with its config; ``cancel`` stops its work early. Raises SandboxError."""
    if item.ability == "math":
        return score_math(
            item.response, str(item.ground_truth), truncated=item.truncated, config=math_cfg, cancel=cancel
        )
    if item.ability == "code":
        return score_code(
            item.response,
            item.ground_truth,
            fn_name=item.fn_name,
            truncated=item.truncated,
            config=code_cfg,
            cancel=cancel,
        )
    raise DataError(f"unknown ability {item.ability!r} (expected 'math' or 'code')")


def score_batch(
    items: Sequence[RewardItem],
    workers: int = 4,
    *,
    math_config: Optional[MathRewardConfig] = None,
    code_config: Optional[CodeRewardConfig] = None,
    deadline_s: Optional[float] = None,
) -> list[RewardResult]:
    """Results in the order of ``items``; one for every item, whatever happens.

    ``deadline_s``: the longest wait for any one item once the previous ones are in
    (default: generous multiples of the math and per-test code limits).
    """
    math_cfg = math_config or MathRewardConfig()
    code_cfg = code_config or CodeRewardConfig()
    if deadline_s is None:
        deadline_s = max(4 * math_cfg.timeout_s + 20, code_cfg.timeout_s * 64 + 20)
    wrong = {"math": math_cfg.wrong_score, "code": 0.0}
    results: list[RewardResult] = []
    cancels = [threading.Event() for _ in items]
    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="reward")
    try:
        futures = [pool.submit(score_item, it, math_cfg, code_cfg, ev) for it, ev in zip(items, cancels)]
        for item, fut, ev in zip(items, futures, cancels):
            score = wrong.get(item.ability, 0.0)
            try:
                results.append(fut.result(timeout=deadline_s))
            except cf.TimeoutError:
                ev.set()
                results.append(RewardResult(score, False, "deadline"))
            except SandboxError as e:
                results.append(RewardResult(score, False, f"{SANDBOX_FAILURE}: {e}"[:500]))
            except Exception as e:  # a scorer bug must cost one item, not the step
                results.append(RewardResult(score, False, f"error: {type(e).__name__}: {e}"[:200]))
    finally:
        for ev in cancels:  # only items still running here are cut short (a deadline, an interrupt)
            ev.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return results


class SandboxFailureBudget:
    """The RL loop's count of sandbox failures (``RewardResult.sandbox_failed``) over a run.

    ``add`` returns how many of ``results`` failed and raises SandboxError, naming the last
    failure, once the run's total exceeds ``limit`` (``reward.code.max_sandbox_failures``).
    """

    def __init__(self, limit: int):
        self.limit, self.total = limit, 0

    def add(self, results: Iterable[RewardResult]) -> int:
        failed = [r for r in results if r.sandbox_failed]
        self.total += len(failed)
        if self.total > self.limit:
            raise SandboxError(
                f"{self.total} code rewards could not run in the sandbox "
                f"(reward.code.max_sandbox_failures={self.limit}); the last: {failed[-1].reason}"
            )
        return len(failed)
