"""Result type shared by every reward function."""

from __future__ import annotations

from dataclasses import dataclass

# Reason prefix of an item whose sandbox failed to start or is unusable: not a wrong answer.
SANDBOX_FAILURE = "sandbox_error"


@dataclass(frozen=True)
class RewardResult:
    """One response's reward. ``reason`` says why, e.g. ``correct``, ``wrong``, ``timeout``."""

    score: float
    correct: bool
    reason: str

    @property
    def sandbox_failed(self) -> bool:
        """The sandbox could not run this item's program: its score means nothing."""
        return self.reason.startswith(SANDBOX_FAILURE)
