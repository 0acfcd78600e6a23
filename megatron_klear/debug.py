"""Debug mode: checks that cost a device-to-host sync, off in production runs.

``MEGATRON_KLEAR_DEBUG=1`` (the tests set it, tests/conftest.py) turns on what a training step
would otherwise pay for with a stalled GPU stream every micro-batch: the micro-batch shape
contract (``MicroBatch.validate``), log-prob targets inside the vocabulary, and finite
policy-loss inputs raised at once instead of counted. Read on every call, so a test may switch it.
"""

from __future__ import annotations

import os

ENV = "MEGATRON_KLEAR_DEBUG"


def enabled() -> bool:
    """True when ``MEGATRON_KLEAR_DEBUG`` is set to anything but empty or ``0``."""
    return os.environ.get(ENV, "") not in ("", "0")
