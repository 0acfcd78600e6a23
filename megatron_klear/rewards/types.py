"""Result type shared by every reward function."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """One response's reward. ``reason`` says why, e.g. ``correct``, ``wrong``, ``timeout``."""

    score: float
    correct: bool
    reason: str
