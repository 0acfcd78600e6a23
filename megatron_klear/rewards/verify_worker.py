"""The math-verify worker: one JSON request a line on stdin, one JSON answer a line on stdout.

Started by ``rewards.math`` as ``python -m megatron_klear.rewards.verify_worker`` with pipes, never
through multiprocessing (whose spawn start re-imports the caller's main module: a plain
script without an ``if __name__ == "__main__"`` guard would run again and die). The parent
kills this process at its time limit, so math-verify's own signal timeouts are off.

Request: ``{"gold": str, "pred": str, "kind": "boxed" | "text"}``. ``boxed``: ``pred`` is the
content of a ``\\boxed{}``; ``text``: free text, read by math-verify's own extraction (the
public KlearReasoner code's rule: its parsed string equal to ``gold``, or verified equal).
Answer: ``{"status": "ok", "value": bool}`` or ``{"status": "error", "message": str}``; the
first line is ``{"status": "ready"}`` once math-verify is imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys


def check(gold: str, pred: str, kind: str) -> bool:
    """True when ``pred`` is equivalent to ``gold`` under math-verify."""
    from math_verify import parse, verify

    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    if kind == "boxed":
        p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
    if kind != "text":
        raise AssertionError(f"unknown kind {kind!r}")  # our own request
    p = parse(pred, parsing_timeout=None)
    if len(p) < 2:  # nothing extracted
        return False
    return p[1] == gold or (bool(g) and bool(verify(g, p, timeout_seconds=None)))


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # a stray print in a library must not corrupt the protocol
    # We disable math-verify's own signal-based timeouts (the parent kills us instead), and
    # it warns about that on every call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (before "ready": each check then gets its whole time limit)

    answers.write(json.dumps({"status": "ready"}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            ans = {"status": "ok", "value": check(req["gold"], req["pred"], req["kind"])}
        except Exception as e:  # a parser bug must not kill the worker
            ans = {"status": "error", "message": repr(e)[:200]}
        answers.write(json.dumps(ans) + "\n")


if __name__ == "__main__":
    main()
