"""Score many responses at once for the RL loop: parallel, ordered, never stalls.

The heavy work of every item already runs in a child process with a hard kill (the
math-verify worker, the code sandbox), so items are dispatched by a pool of threads, each
with its own math-verify process. Every item gets a result: an exception or a missed
deadline scores as wrong with a reason that says so (the loop counts them).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_klear.rewards.code import CodeRewardConfig, score_code
from megatron_klear.rewards.math import MathRewardConfig, score_math
from megatron_klear.rewards.types import RewardResult


@dataclass(frozen=True)
class RewardItem:
    """One response to score. ``ground_truth``: the answer (math) or the tests (code)."""

    ability: str  # "math" or "code"
    response: str
    ground_truth: Any
    truncated: bool = False
    fn_name: Optional[str] = None


def score_item(item: RewardItem, math_cfg: MathRewardConfig, code_cfg: CodeRewardConfig) -> RewardResult:
    if item.ability == "math":
        return score_math(item.response, str(item.ground_truth), truncated=item.truncated, config=math_cfg)
    if item.ability == "code":
        return score_code(
            item.response, item.ground_truth, fn_name=item.fn_name, truncated=item.truncated, config=code_cfg
        )
    raise ValueError(f"unknown ability {item.ability!r} (expected 'math' or 'code')")


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
    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="reward")
    try:
        futures = [pool.submit(score_item, it, math_cfg, code_cfg) for it in items]
        for item, fut in zip(items, futures):
            try:
                results.append(fut.result(timeout=deadline_s))
            except cf.TimeoutError:
                results.append(RewardResult(wrong.get(item.ability, 0.0), False, "deadline"))
            except Exception as e:  # a scorer bug must cost one item, not the step
                results.append(
                    RewardResult(wrong.get(item.ability, 0.0), False, f"error: {type(e).__name__}: {e}"[:200])
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return results
