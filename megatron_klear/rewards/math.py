"""Math reward: the answer after ``</think>``, checked with math-verify.

Where the answer comes from (``MathRewardConfig.answer``):

* ``boxed`` (default, the paper): the last ``\\boxed{}`` after the last ``</think>``;
* ``after_think`` (the public KlearReasoner code, ``math_dapo.py`` with math-verify): math-verify's
  own extraction from the text after the last ``</think>``; no ``\\boxed{}`` needed;
* ``whole`` (the public ``benchmarks/judge_math.py``): math-verify on the whole response.
  ``score_math_lenient`` scores this way for evaluation reports.

Format rules (``format_rule``): ``pair`` (default) wants a ``<think>`` that opens before a
``</think>`` (else ``format_score``); ``public`` scores a response without ``</think>`` as
``missing_think_end_score`` (-0.5) and one without ``<think>`` as ``missing_think_start_score``
(-2.0), checked in that order as the public code does; ``none`` has no rule.

All text handling here is linear in the response length; math-verify itself (parsing and
sympy, which can hang on pathological LaTeX) runs in a separate worker process that is
killed and replaced at the time limit: a timeout scores as wrong with reason ``timeout`` and
never blocks the caller longer than the limit. The worker is a plain subprocess running
``python -m megatron_klear.rewards.verify_worker``: rewards work from any script, with or
without an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_klear.errors import ConfigError, RewardError
from megatron_klear.rewards.types import RewardResult

ANSWER_SOURCES = ("boxed", "after_think", "whole")
MATH_FORMAT_RULES = ("pair", "public", "none")
_POLL_S = 0.05  # how often a waiting check looks at its cancel event


@dataclass(frozen=True)
class MathRewardConfig:
    """Reward values, rules and limits. The recipe uses +1 / -1; 1 / 0 is common too."""

    correct_score: float = 1.0
    wrong_score: float = -1.0
    format_score: float = -1.0  # format_rule "pair": no <think> ... </think> pair
    format_rule: str = "pair"  # "pair" | "public" | "none" (see the module docstring)
    missing_think_end_score: float = -0.5  # format_rule "public": no </think>
    missing_think_start_score: float = -2.0  # format_rule "public": no <think>
    answer: str = "boxed"  # "boxed" | "after_think" | "whole"
    truncated_is_wrong: bool = True  # False: a response cut at the length limit is scored as any other
    timeout_s: float = 5.0

    def validate(self, where: str = "reward.math") -> None:
        """Raises ConfigError naming ``<where>.<field>`` (the config loader passes the section's path)."""
        if self.format_rule not in MATH_FORMAT_RULES:
            raise ConfigError(f"{where}.format_rule must be one of {MATH_FORMAT_RULES}, got {self.format_rule!r}")
        if self.answer not in ANSWER_SOURCES:
            raise ConfigError(f"{where}.answer must be one of {ANSWER_SOURCES}, got {self.answer!r}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"{where}.timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        for name in (
            "correct_score",
            "wrong_score",
            "format_score",
            "missing_think_end_score",
            "missing_think_start_score",
        ):
            check_finite(self, name, where)


def check_finite(cfg, name: str, where: str) -> None:
    """Raises ConfigError unless ``cfg.<name>`` is a finite number (named ``<where>.<name>``)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{name} must be a finite number, got {value!r}")


# The lenient evaluation score (the public benchmarks/judge_math.py): math-verify on the whole
# response, no format rule, truncation not special.
LENIENT = MathRewardConfig(
    correct_score=1.0, wrong_score=0.0, format_rule="none", answer="whole", truncated_is_wrong=False
)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` whose brace closes (nested braces handled), or None.

    Linear time: every brace is matched once with a stack, then the ``\\boxed`` occurrences
    are tried from the last one back.
    """
    start = text.rfind("\\boxed")
    if start == -1:
        return None
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{" and i in close:
            return text[i + 1 : close[i]]
        start = text.rfind("\\boxed", 0, start)  # unbalanced: try the one before
    return None


def has_think_block(response: str) -> bool:
    """True if ``<think>`` opens before a ``</think>`` that closes it."""
    close = response.find("</think>")
    return close != -1 and response.find("<think>") != -1 and response.find("<think>") < close


def after_think(response: str) -> str:
    """The text after the last ``</think>`` (all of it when there is none)."""
    end = response.rfind("</think>")
    return response if end == -1 else response[end + len("</think>") :]


def public_format_failure(
    response: str, end_score: float, start_score: float, correct: bool = False
) -> Optional[RewardResult]:
    """The public code's think-tag rule: no ``</think>`` first, then no ``<think>``; None if both."""
    if "</think>" not in response:
        return RewardResult(end_score, correct, "format: no </think>")
    if "<think>" not in response:
        return RewardResult(start_score, correct, "format: no <think>")
    return None


def _format_failure(response: str, c: MathRewardConfig) -> Optional[RewardResult]:
    if c.format_rule == "pair" and not has_think_block(response):
        return RewardResult(c.format_score, False, "format")
    if c.format_rule == "public":
        return public_format_failure(response, c.missing_think_end_score, c.missing_think_start_score)
    return None


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


class MathVerifier:
    """A math-verify worker process with a hard per-check time limit (thread-safe)."""

    STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports math-verify and sympy first

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._buf = b""

    def _start(self, cancel: Optional[threading.Event]) -> None:
        root = _package_root()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable or "python3", "-m", "megatron_klear.rewards.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,  # never the caller's directory first on the worker's sys.path
            env=env,
        )
        self._buf = b""
        # Wait for the imports here, so that every check gets exactly its own time limit.
        status, answer = self._receive(time.monotonic() + self.STARTUP_TIMEOUT_S, cancel)
        if status != "ok" or answer.get("status") != "ready":
            self._stop()
            if status == "cancelled":
                raise _Cancelled()
            raise RewardError(f"math-verify worker did not start ({status}: {answer})")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
        self._proc = None

    def _receive(self, deadline: float, cancel: Optional[threading.Event]) -> tuple[str, object]:
        """One answer line: ("ok", dict), ("timeout", None), ("cancelled", None) or ("died", msg)."""
        fd = self._proc.stdout.fileno()
        poller = select.poll()  # not select.select: a trainer's descriptors can pass FD_SETSIZE
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            if cancel is not None and cancel.is_set():
                return "cancelled", None
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", None
            if poller.poll(1e3 * min(left, _POLL_S)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return "died", f"exit code {self._proc.poll()}"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return "ok", json.loads(line)

    def check(
        self, gold: str, pred: str, timeout_s: float, kind: str = "boxed", cancel: Optional[threading.Event] = None
    ) -> tuple[str, object]:
        """``("ok", bool)``, ``("timeout", None)``, ``("cancelled", None)`` or ``("error", message)``."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start(cancel)
            except _Cancelled:
                return "cancelled", None
            try:
                self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred, "kind": kind}) + "\n").encode())
                self._proc.stdin.flush()
            except OSError as e:
                self._stop()
                return "error", f"verifier died: {e!r}"
            status, answer = self._receive(time.monotonic() + timeout_s, cancel)
            if status == "ok":
                return ("ok", bool(answer["value"])) if answer["status"] == "ok" else ("error", answer["message"])
            self._stop()  # hung in sympy, cancelled or dead: the next check starts a fresh one
            return ("error", f"verifier died: {answer}") if status == "died" else (status, None)

    def close(self) -> None:
        with self._lock:
            self._stop()


class _Cancelled(Exception):
    pass


# Idle verifiers, shared by all threads: scoring threads come and go (a thread pool per
# batch), while each verifier's process (sympy imports: ~1 s) lives for the whole run.
_idle: list[MathVerifier] = []
_idle_lock = threading.Lock()


@contextlib.contextmanager
def _verifier():
    with _idle_lock:
        v = _idle.pop() if _idle else MathVerifier()
    try:
        yield v
    finally:
        with _idle_lock:
            _idle.append(v)


def score_math(
    response: str,
    ground_truth: str,
    *,
    truncated: bool = False,
    config: Optional[MathRewardConfig] = None,
    cancel: Optional[threading.Event] = None,
    **cfg,
) -> RewardResult:
    """Score one math response against its ground-truth answer.

    Keyword overrides of ``MathRewardConfig`` fields are accepted (``correct_score=1.0``...).
    ``truncated``: the engine stopped at the length limit (wrong unless
    ``truncated_is_wrong=False``). ``cancel``: when set, a running check is killed at once
    (reason ``cancelled``).
    """
    c = config or MathRewardConfig(**cfg)
    if truncated and c.truncated_is_wrong:
        return RewardResult(c.wrong_score, False, "truncated")
    failed = _format_failure(response, c)
    if failed is not None:
        return failed
    gold = last_boxed(ground_truth) or ground_truth
    if c.answer == "boxed":
        answer = last_boxed(after_think(response))
        if answer is None:
            return RewardResult(c.wrong_score, False, "no_boxed")
        kind = "boxed"
    else:
        answer, kind = (after_think(response) if c.answer == "after_think" else response), "text"
    with _verifier() as v:
        status, value = v.check(gold, answer, c.timeout_s, kind, cancel)
    if status in ("timeout", "cancelled"):
        return RewardResult(c.wrong_score, False, status)
    if status == "error":
        return RewardResult(c.wrong_score, False, "verify_error")
    return RewardResult(c.correct_score, True, "correct") if value else RewardResult(c.wrong_score, False, "wrong")


def score_math_lenient(
    response: str, ground_truth: str, *, timeout_s: float = 5.0, cancel: Optional[threading.Event] = None
) -> RewardResult:
    """Scored like the public ``benchmarks/judge_math.py`` (for comparing with published
    numbers): math-verify on the whole response, no format rule, truncation not special;
    1.0 when correct, else 0.0."""
    return score_math(response, ground_truth, config=dataclasses.replace(LENIENT, timeout_s=timeout_s), cancel=cancel)
