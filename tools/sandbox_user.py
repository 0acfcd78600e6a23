"""A throw-away ordinary user for the sandbox tests and benchmark, and running Python as it.

Root only: ``temporary_user`` creates a user with a home directory (firejail needs one) and
removes it, home included, afterwards. ``python_as`` runs a script of this repository as that
user with a clean environment and an interpreter the user can execute (a virtualenv under
/root is not one: the system python3 is used then, with the repository on ``PYTHONPATH``;
the reward code needs only the standard library for code scoring).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]


class UserUnavailable(Exception):
    """No ordinary user can be made or used here; the message says why."""


def _can_run_as(user: str, argv: list[str]) -> bool:
    r = subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, timeout=60)
    return r.returncode == 0


@contextlib.contextmanager
def temporary_user(prefix: str = "mksbx") -> Iterator[str]:
    """Create a user named ``<prefix><pid>`` (unique per process), yield its name, delete it.

    Raises UserUnavailable (with the reason) when not root or when useradd/runuser fail.
    """
    if os.geteuid() != 0:
        raise UserUnavailable("creating a test user needs root")
    for tool in ("useradd", "userdel", "runuser"):
        if not shutil.which(tool):
            raise UserUnavailable(f"{tool} is not installed")
    name = f"{prefix}{os.getpid()}"
    home = f"/home/{name}"
    r = subprocess.run(["useradd", "-m", "-d", home, "-s", "/bin/sh", name], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserUnavailable(f"useradd {name} failed: {r.stderr.strip()}")
    try:
        yield name
    finally:
        for pid in user_processes(pwd.getpwnam(name).pw_uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def user_processes(uid: int) -> list[int]:
    """Pids of the processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:  # gone meanwhile
            continue
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()
        if int(uids[1]) == uid:
            pids.append(int(entry))
    return pids


@functools.lru_cache(maxsize=None)
def user_python(user: str) -> tuple[str, ...]:
    """argv prefix of a Python >= 3.10 that ``user`` can run and that imports this repository."""
    probe = ["-c", "import sys, megatron_klear.rewards.sandbox; assert sys.version_info >= (3, 10)"]
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if exe and os.path.exists(exe) and _can_run_as(user, ["env", f"PYTHONPATH={ROOT}", exe, *probe]):
            return (exe,)
    raise UserUnavailable(f"no Python interpreter that user {user} can run imports {ROOT} (is it readable?)")


def python_as(
    user: str, args: list[str], env: Optional[dict] = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python args...`` as ``user`` from the repository root, with a minimal environment."""
    home = os.path.expanduser(f"~{user}")
    base = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
    argv = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in {**base, **(env or {})}.items())]
    return subprocess.run(
        argv + list(user_python(user)) + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
