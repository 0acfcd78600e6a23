"""An output directory belongs to one run.

- ``claim_output_dir`` (collective): rank 0 creates the folder (one that cannot be written is an
  error naming ``output_dir``, before any model is built) and takes its lock, ``run.lock``: an
  ``flock`` the kernel drops when the holder dies (even by kill -9), in a file naming the
  holder's PID and host. A second live run is refused with that PID and host; the lock of a dead
  run is taken over, saying so. Where the file system has no ``flock``, the named holder is
  checked instead (alive on this host, or on another host: refused).
- ``check_resume_config``: a resume compares the config kept with the checkpoint with its own
  and refuses a changed seed, model, data or any other key outside ``FREE_KEYS`` unless
  ``checkpoint.allow_config_change`` is set.
- ``open_run`` does the first two (and finds the checkpoint to resume), ``start_logs`` the last.
- ``truncate_rows``: after a resume, the metric rows of steps past the checkpoint go (they are
  re-run), so ``metrics.jsonl`` keeps one row per step.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from megatron_klear.config import to_dict
from megatron_klear.distributed import broadcast_object, is_main
from megatron_klear.errors import ConfigError, KlearError, OutputDirError
from megatron_klear.training.checkpoint import Resume, find_resumable

LOCK_NAME = "run.lock"
# Keys a resumed run may change freely: how long to run, what to log and save, where helpers run,
# how long a collective may wait and which network the ranks use (a requeued job may get other nodes).
FREE_KEYS = (
    "output_dir",
    "train_steps",
    "epochs",
    "bootstrap",
    "checkpoint.*",
    "log.*",
    "eval.interval",
    "eval.at_start",
    "eval.at_end",
    "rollout.dump",
    "rollout.reward_workers",
    "rollout.sglang.*",
    "data.cache_dir",
    "data.workers",
    "data.generate",
    "parallel.timeout_minutes",
    "parallel.socket_ifname",
)
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid')} on host {holder.get('host')} (since {started})"


class RunLock:
    """The exclusive lock of one output directory, held by this process until ``release`` (or
    its death)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: Optional[int] = None

    def _holder(self) -> dict:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace") if self.fd is not None else ""
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> Optional[dict]:
        """Take the lock; returns the dead holder it took over, if the file named one."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = self._holder()
            self._close()
            raise OutputDirError(
                f"output_dir {self.path.parent} is in use by another live run: {_describe(holder)}; "
                f"wait for it to end or choose another output_dir"
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            flocked = False
        previous = self._holder()
        if not flocked and previous.get("pid"):
            same_host = previous.get("host") == socket.gethostname()
            if not same_host or _alive(int(previous["pid"])):
                self._close()
                raise OutputDirError(
                    f"output_dir {self.path.parent} is in use by another run: {_describe(previous)} (this file "
                    "system has no flock, so a run on another host cannot be checked; "
                    f"if it is dead, delete {self.path})"
                )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)
        atexit.register(self.release)
        return previous if previous.get("pid") else None

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Clear the holder and drop the lock (the file stays: removing it would race a new run)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        self._close()


def check_writable(out: Path) -> None:
    """Create ``out`` and write into it; an error naming ``output_dir`` when that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output_dir {out} is not writable ({e.strerror or e})") from e


def claim_output_dir(out: str | Path) -> Optional[RunLock]:
    """Collective: rank 0 checks that ``out`` is writable and takes its lock; every rank raises
    the same error when it cannot. Returns the lock on rank 0 (None elsewhere)."""
    out = Path(out)
    lock, outcome = None, None
    if is_main():
        try:
            check_writable(out)
            lock = RunLock(out)
            previous = lock.acquire()
            if previous:
                print(f"output_dir {out}: took over the lock of a run that is gone: {_describe(previous)}", flush=True)
        except KlearError as e:
            outcome = e
    outcome = broadcast_object(outcome)
    if outcome is not None:
        raise outcome
    return lock


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}`` (lists are values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_free(key: str) -> bool:
    """True when a resumed run may change ``key`` without ``checkpoint.allow_config_change``."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in FREE_KEYS)


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every key outside ``FREE_KEYS`` that differs."""
    a, b = flatten(saved), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not is_free(k)]


def check_resume_config(saved: Optional[dict], new: dict, allow: bool, source: Path) -> list[str]:
    """Refuse to resume the run saved at ``source`` (config ``saved``) with a different config
    ``new`` unless ``allow``; returns the changed keys (printed when allowed)."""
    if saved is None:
        return []
    changes = config_changes(saved, new)
    if not changes:
        return []
    shown = "; ".join(f"{k}: {old!r} -> {cur!r}" for k, old, cur in changes[:8])
    more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
    if not allow:
        raise ConfigError(
            f"cannot resume {source} with a different config: {shown}{more}. Resume with the saved values, "
            f"choose another output_dir, or set checkpoint.allow_config_change=true "
            f"(free to change: {', '.join(FREE_KEYS)})"
        )
    if is_main():
        print(f"resume with a changed config (checkpoint.allow_config_change): {shown}{more}", flush=True)
    return [k for k, _, _ in changes]


def truncate_rows(path: Path, last_step: int) -> int:
    """Keep the JSONL rows of ``path`` whose ``step`` is at most ``last_step`` (rows of steps a
    resume re-runs go, and so does a torn last line); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def writable_problem(out: Path) -> Optional[str]:
    """Why ``out`` could not be created or written (None: it can), without creating anything."""
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    try:  # access() says yes to root everywhere; a file made and dropped at once tells the truth
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p} is not writable ({e.strerror or e})"
    return None


def open_run(cfg: Any) -> tuple[Optional[RunLock], Resume]:
    """Collective, before any model is built: claim ``cfg.output_dir`` and find the checkpoints a
    resume may load (``checkpoint.resume``), refusing a resume whose saved config differs from
    ``cfg`` beyond the free keys. Returns the lock (rank 0) and the resume plan."""
    out = Path(cfg.output_dir)
    lock = claim_output_dir(out)
    resume = find_resumable(out / "checkpoints") if cfg.checkpoint.resume else Resume()
    if resume.candidates:
        saved = resume.saved_config()
        if saved is None and (out / "config.json").is_file():  # checkpoints from before run_config.json
            saved = json.loads((out / "config.json").read_text())
        check_resume_config(saved, to_dict(cfg), cfg.checkpoint.allow_config_change, resume.candidates[0])
    return lock, resume


def start_logs(cfg: Any, step: Optional[int]) -> None:
    """Rank 0: the run's ``config.json``, and its JSONL logs cut back to ``step`` (a resume
    re-runs what follows; None: a fresh start keeps no rows of an earlier attempt)."""
    if not is_main():
        return
    out = Path(cfg.output_dir)
    for name in ("metrics.jsonl", "eval.jsonl"):
        dropped = truncate_rows(out / name, -1 if step is None else step)
        if dropped:
            print(f"{name}: dropped {dropped} rows of steps after {step or 0} (they are re-run)", flush=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
