"""Math reward: the last ``\\boxed{}`` after ``</think>``, checked with math-verify.

math-verify can hang on pathological LaTeX (sympy), so every check runs in a separate
worker process that is killed and replaced at the time limit: a timeout scores as wrong
with reason ``timeout`` and never blocks the caller for longer than the limit.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from dataclasses import dataclass
from typing import Optional

from megatron_klear.rewards.types import RewardResult


@dataclass(frozen=True)
class MathRewardConfig:
    """Reward values and limits. The recipe uses +1 / -1; 1 / 0 is common too."""

    correct_score: float = 1.0
    wrong_score: float = -1.0
    format_score: float = -1.0  # a response without a <think> ... </think> pair
    require_think: bool = True
    timeout_s: float = 5.0


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces handled), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
                j += 1
        start = text.rfind("\\boxed", 0, start)  # unbalanced: try the one before
    return None


def has_think_block(response: str) -> bool:
    """True if ``<think>`` opens before a ``</think>`` that closes it."""
    close = response.find("</think>")
    return close != -1 and response.find("<think>") != -1 and response.find("<think>") < close


def _verify_loop(conn) -> None:  # runs in the worker process
    import logging

    from math_verify import parse, verify

    # We disable math-verify's own signal-based timeouts (the parent kills us instead), and
    # it warns about that on every call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send(("ready", None))

    while True:
        try:
            gold, pred = conn.recv()
        except EOFError:
            return
        try:
            g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
            p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
            ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
            conn.send(("ok", ok))
        except Exception as e:  # a parser bug must not kill the worker
            conn.send(("error", repr(e)[:200]))


class MathVerifier:
    """A math-verify worker process with a hard per-check time limit (thread-safe)."""

    STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports math-verify and sympy first

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_verify_loop, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        # Wait for the imports here, so that every check gets exactly its own time limit.
        if not parent.poll(self.STARTUP_TIMEOUT_S) or parent.recv()[0] != "ready":
            self._stop()
            raise RuntimeError("math-verify worker did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def check(self, gold: str, pred: str, timeout_s: float) -> tuple[str, object]:
        """``("ok", bool)``, ``("timeout", None)`` or ``("error", message)``."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send((gold, pred))
                if self._conn.poll(timeout_s):
                    return self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as e:
                self._stop()
                return "error", f"verifier died: {e!r}"
            self._stop()  # hung in sympy: kill it; the next check starts a fresh one
            return "timeout", None

    def close(self) -> None:
        with self._lock:
            self._stop()


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
    response: str, ground_truth: str, *, truncated: bool = False, config: Optional[MathRewardConfig] = None, **cfg
) -> RewardResult:
    """Score one math response against its ground-truth answer.

    Keyword overrides of ``MathRewardConfig`` fields are accepted (``correct_score=1.0``...).
    ``truncated``: the engine stopped at the length limit, so the response is wrong.
    """
    c = config or MathRewardConfig(**cfg)
    if truncated:
        return RewardResult(c.wrong_score, False, "truncated")
    if c.require_think and not has_think_block(response):
        return RewardResult(c.format_score, False, "format")
    tail = response[response.rfind("</think>") + len("</think>") :] if "</think>" in response else response
    answer = last_boxed(tail)
    if answer is None:
        return RewardResult(c.wrong_score, False, "no_boxed")
    gold = last_boxed(ground_truth) or ground_truth
    with _verifier() as v:
        status, value = v.check(gold, answer, c.timeout_s)
    if status == "timeout":
        return RewardResult(c.wrong_score, False, "timeout")
    if status == "error":
        return RewardResult(c.wrong_score, False, "verify_error")
    return RewardResult(c.correct_score, True, "correct") if value else RewardResult(c.wrong_score, False, "wrong")
