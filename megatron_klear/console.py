"""What a run prints: every console line carries the time and the rank, and long silent phases
(token-cache build, evaluation, inference-server start-up) print progress lines.

``install(rank)`` prefixes each line written to stdout and stderr with
``YYYY-mm-dd HH:MM:SS [rank R]``, whoever writes it (our code, Megatron, transformers), so the
interleaved output of several ranks can be read. Progress lines are plain lines, not a
terminal bar, so they reach log files and Slurm output too; their period is
``MEGATRON_KLEAR_PROGRESS_S`` seconds (default 30).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

PROGRESS_ENV = "MEGATRON_KLEAR_PROGRESS_S"


def stamp(rank: int) -> str:
    """The prefix of a console line: local time and rank."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank {rank}] "


class _Prefixed:
    """A text stream that starts every line with ``stamp(rank)``."""

    def __init__(self, stream: TextIO, rank: int):
        self._stream, self._rank, self._at_line_start = stream, rank, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(stamp(self._rank))
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def installed_rank() -> Optional[int]:
    """The rank this process's console lines carry, or None when ``install`` was not called
    (a spawned helper installs the same one: ``distributed.spawn``)."""
    return sys.stdout._rank if isinstance(sys.stdout, _Prefixed) else None


def install(rank: int) -> None:
    """Prefix this process's stdout and stderr lines with time and ``rank`` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _Prefixed):
            setattr(sys, name, _Prefixed(stream, rank))


def progress_period() -> float:
    """Seconds between two progress lines of one phase."""
    return float(os.environ.get(PROGRESS_ENV, "30"))


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Periodic progress lines of one long phase:
    ``desc: done/total unit (pct), elapsed, ~left`` (or ``done unit (pct of what), ...``).

    ``update(done)`` is cheap; it prints only when ``period`` seconds passed since the last line.
    ``fraction`` (0..1) gives the share done when ``total`` is not known in ``unit``s (the bytes of
    a file read so far). ``finish()`` prints the closing line with the total time.
    """

    def __init__(
        self,
        desc: str,
        total: Optional[float] = None,
        unit: str = "",
        period: Optional[float] = None,
        of_what: str = "",
    ):
        self.desc, self.total, self.unit, self.of_what = desc, total, unit, of_what
        self.period = progress_period() if period is None else period
        self.start = self.last = time.time()
        self.done, self.fraction = 0.0, None

    def line(self) -> str:
        elapsed = time.time() - self.start
        text = f"{self.desc}: {self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        text += f" {self.unit}".rstrip()
        frac = self.fraction if self.fraction is not None else self.done / self.total if self.total else None
        if frac is not None:
            text += f" ({100 * min(frac, 1.0):.0f}%{' of ' + self.of_what if self.of_what else ''})"
        text += f", {duration(elapsed)} elapsed"
        if frac is not None and 0 < frac < 1:
            text += f", ~{duration(elapsed * (1 - frac) / frac)} left"
        return text

    def update(self, done: float, fraction: Optional[float] = None) -> None:
        """Record progress; print a line when the period has passed."""
        self.done, self.fraction = done, fraction
        now = time.time()
        if now - self.last >= self.period:
            self.last = now
            print(self.line(), flush=True)

    def finish(self) -> None:
        text = f"{self.desc}: done, {self.done:,.0f} {self.unit}".rstrip()
        print(f"{text} in {duration(time.time() - self.start)}", flush=True)


@contextmanager
def heartbeat(desc: str, period: Optional[float] = None) -> Iterator[None]:
    """Print ``desc: N s elapsed`` every ``period`` seconds while the block runs (a phase that
    cannot count its own progress, e.g. one generation call), from a daemon thread."""
    period = progress_period() if period is None else period
    stop = threading.Event()
    start = time.time()

    def beat() -> None:
        while not stop.wait(period):
            print(f"{desc}: {duration(time.time() - start)} elapsed", flush=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
