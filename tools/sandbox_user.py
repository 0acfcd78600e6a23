"""For the sandbox tests and benchmark: a throw-away ordinary user, running Python as it, and
a run's memory as the host sees it.

Root only: ``temporary_user`` creates a user with a home directory (firejail needs one) and
removes it, home included, afterwards. ``python_as`` runs a script of this repository as that
user with a clean environment and an interpreter the user can execute (a virtualenv under
/root is not one: the system python3 is used then, with the repository on ``PYTHONPATH``;
the reward code needs only the standard library for code scoring). ``HostPeak`` samples the
memory of a run's processes from /proc, independently of the sandbox's own accounting;
``FORKED_CHILDREN`` is the program that a per-process memory limit did not stop.
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

# Eight children of 100 MB each (touched): 800 MB in all, each under any per-process limit.
FORKED_CHILDREN = """import os, time
kids = []
for i in range(8):
    pid = os.fork()
    if pid == 0:
        x = b"\\x01" * (100 << 20)
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
print("done")
"""


class HostPeak:
    """The peak resident memory (RssAnon + RssShmem, summed) of the processes that start while
    it watches, whose real uid is in [lo, hi), sampled from /proc every 2 ms by a process of
    its own: the host's view of a run, independent of the sandbox's own accounting."""

    _SRC = """import os, select, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
before = {e for e in os.listdir("/proc") if e.isdigit()}
print("ready", flush=True)
peak = 0
while not select.select([0], [], [], 0.002)[0]:
    total = 0
    for e in os.listdir("/proc"):
        if e in before:
            continue
        try:
            with open(f"/proc/{e}/status", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        uid = next((int(x.split()[1]) for x in lines if x.startswith(b"Uid:")), -1)
        if lo <= uid < hi:
            total += sum(int(x.split()[1]) for x in lines if x.startswith((b"RssAnon:", b"RssShmem:"))) << 10
    peak = max(peak, total)
print(peak)
"""

    def __init__(self, uid_range: tuple[int, int]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self._SRC, *map(str, uid_range)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the memory sampler did not start")

    def stop_mb(self) -> float:
        out, _ = self.proc.communicate("x")
        return int(out) / 2**20


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
