"""Rewards: math (math-verify + <think> format), code (sandboxed test-case pass rate)."""

from megatron_klear.rewards.types import RewardResult  # noqa: F401
