"""The memory limit of a whole sandbox run: all of its processes together, in resident memory.

A per-process address-space limit lets a run of N processes take N times the limit; these
mechanisms limit the run. One is picked per process and user (``mechanism()``, logged once):

* ``cgroup``: where a cgroup v2 subtree with the memory and pids controllers is writable
  (root, or a user slice delegated by systemd), every run gets a cgroup of its own under
  ``<parent>/megatron-klear-<pid>``: ``memory.max`` (the limit), ``memory.swap.max=0``,
  ``memory.oom.group=1`` (an out-of-memory kill takes the whole run) and ``pids.max``. The
  run's first process moves itself in before it starts the sandbox (``echo 0 > cgroup.procs``,
  then ``exec``), so everything the run starts is inside. The kernel enforces the limit
  exactly and counts all of the run's memory: anonymous, shared, its tmpfs files, page cache.
  The parent is the nearest ancestor of this process's cgroup whose ``cgroup.subtree_control``
  already enables memory and pids (nothing of the host's cgroup setup is changed).
* ``poll``: otherwise the thread that runs the sandbox calls ``PolledRun.over`` every
  ``POLL_S``: it sums the resident memory (RssAnon + RssShmem) of the run's process tree,
  found in /proc from the process it started; above the limit it sums the proportional set
  sizes instead (pages that forked copies share count once, as a cgroup counts them), and
  above the limit by that measure too the run is killed. Best effort: between two polls a run
  can grow by what it can touch in ``POLL_S``; it does not see files in the run's tmpfs (each
  capped at ``disk_mb`` separately), nor System V shared memory or memfd files that no process
  maps (both go when the run ends). The address-space rlimit on each process stays as a
  backstop.

Either way a run over its limit ends as "memory exceeded". ``MEGATRON_KLEAR_SANDBOX_MEMORY``
(``auto``, the default; ``cgroup``; ``poll``) forces a mechanism; ``cgroup`` where none is
usable is a SandboxError that says why.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from megatron_klear.errors import SandboxError

log = logging.getLogger(__name__)

POLL_S = 0.025  # the poller's period: four checks per 100 ms
ENV = "MEGATRON_KLEAR_SANDBOX_MEMORY"
CHOICES = ("auto", "cgroup", "poll")
MACHINERY_PIDS = 16  # pids.max beyond max_procs: bwrap / firejail and the supervisor shell
_CONTROLLERS = ("memory", "pids")
_JOIN = 'echo 0 > "$0" && exec "$@"'  # sh -c _JOIN CGROUP_PROCS CMD...: join the cgroup, run CMD
_END_WAIT_S = 5.0


@dataclass(frozen=True)
class Mechanism:
    """How runs are limited: ``kind`` "cgroup" (runs' cgroups go under ``parent``) or "poll"
    (``why``: why no cgroup is used)."""

    kind: str
    parent: Optional[Path] = None
    why: str = ""

    def describe(self) -> str:
        if self.kind == "cgroup":
            return (
                f"cgroup v2, a cgroup per run under {self.parent} "
                "(memory.max, memory.swap.max=0 where swap is accounted, memory.oom.group=1, pids.max)"
            )
        return (
            f"polling: the summed resident memory of each run's process tree, every {POLL_S * 1e3:.0f} ms; "
            f"no cgroup because {self.why}"
        )


_mechanisms: dict[tuple[int, str], Mechanism] = {}
_lock = threading.Lock()


def mechanism() -> Mechanism:
    """The mechanism for this process and user (found once, then logged once at INFO).

    Raises SandboxError for a bad ``MEGATRON_KLEAR_SANDBOX_MEMORY`` or a forced ``cgroup``
    that cannot be used here.
    """
    choice = os.environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise SandboxError(f"{ENV}={choice!r}: must be one of {CHOICES}")
    key = (os.geteuid(), choice)
    with _lock:
        if key not in _mechanisms:
            if choice == "poll":
                found = Mechanism("poll", why=f"{ENV} is poll")
            else:
                found = _find_cgroup()
                if choice == "cgroup" and found.kind != "cgroup":
                    raise SandboxError(f"{ENV}=cgroup, but no cgroup v2 subtree is usable here: {found.why}")
            _mechanisms[key] = found
            log.info("sandbox memory limit per run: %s", found.describe())
        return _mechanisms[key]


# --- cgroup v2 ------------------------------------------------------------------------------


def _cgroup2_dir() -> tuple[Optional[Path], Optional[Path], str]:
    """(the cgroup2 mount point, this process's cgroup directory in it, "") or (None, None, why)."""
    try:
        own = next(
            line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")
        )
    except (OSError, StopIteration):
        return None, None, "this process is in no cgroup v2 hierarchy"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        if fs.split()[:1] != ["cgroup2"]:
            continue
        root, mount = parts[3], Path(parts[4])
        rel = os.path.relpath(own, root)
        if not rel.startswith(".."):
            return mount, (mount / rel).resolve(), ""
    return None, None, "no cgroup2 file system is mounted"


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _find_cgroup() -> Mechanism:
    """The nearest usable ancestor of this process's cgroup, probed with a real cgroup, or
    the poll mechanism with the reason."""
    mount, own, why = _cgroup2_dir()
    if own is None:
        return Mechanism("poll", why=why)
    if "memory" not in _words(mount / "cgroup.controllers"):
        return Mechanism(
            "poll", why=f"the cgroup v2 hierarchy at {mount} has no memory controller (cgroup v1 holds it)"
        )
    reasons = []
    for cand in [own, *own.parents]:
        if mount not in (cand, *cand.parents):
            break
        missing = [c for c in _CONTROLLERS if c not in _words(cand / "cgroup.subtree_control")]
        if missing:
            reasons.append(f"{cand} does not enable {'/'.join(missing)} for its children")
            continue
        if not (os.access(cand, os.W_OK | os.X_OK) and os.access(cand / "cgroup.procs", os.W_OK)):
            reasons.append(f"{cand} is not writable by uid {os.geteuid()}")
            continue
        try:
            return Mechanism("cgroup", parent=_make_subtree(cand))
        except (OSError, SandboxError) as e:
            reasons.append(f"{cand}: {e}")
    return Mechanism("poll", why="no usable cgroup v2 subtree: " + "; ".join(reasons or ["none found"]))


def _make_subtree(parent: Path) -> Path:
    """``parent/megatron-klear-<pid>`` with memory and pids enabled for its children, checked
    by moving a shell into a limited child cgroup; removed at exit."""
    sub = parent / f"megatron-klear-{os.getpid()}"
    sub.mkdir(exist_ok=True)
    try:
        (sub / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CONTROLLERS))
        probe = CgroupRun(sub, memory_mb=64, max_procs=4)
        try:
            r = subprocess.run(probe.command(["/bin/true"]), capture_output=True, text=True, timeout=30)
        finally:
            probe.end()
        if r.returncode != 0:
            raise SandboxError(f"a process could not join {probe.dir}: {r.stderr.strip()[-200:]}")
    except BaseException:
        _remove_subtree(sub)
        raise
    atexit.register(_remove_subtree, sub)
    return sub


def _remove_subtree(sub: Path) -> None:
    for d in [*sub.glob("run-*"), sub]:
        try:
            d.rmdir()
        except OSError:
            pass


_run_ids = itertools.count()


class CgroupRun:
    """One run's cgroup: made and limited at construction, joined by ``command``'s first
    process, killed and removed by ``end``."""

    def __init__(self, parent: Path, memory_mb: int, max_procs: int):
        self.dir = parent / f"run-{os.getpid()}-{next(_run_ids)}"
        self.exceeded = False
        self.dir.mkdir()
        settings = {
            "memory.max": str(memory_mb * 2**20),
            "memory.swap.max": "0",
            "memory.oom.group": "1",
            "pids.max": str(max_procs + MACHINERY_PIDS),
        }
        try:
            for name, value in settings.items():
                if name == "memory.max" or (self.dir / name).exists():  # no swap accounting: no swap file
                    (self.dir / name).write_text(value)
        except OSError as e:
            self.dir.rmdir()
            raise SandboxError(f"cannot limit the run's cgroup {self.dir}: {e}") from e

    def command(self, cmd: list[str]) -> list[str]:
        return ["/bin/sh", "-c", _JOIN, str(self.dir / "cgroup.procs"), *cmd]

    def started(self, pid: int) -> None:
        pass

    def over(self) -> bool:
        return False  # the kernel enforces the limit

    def end(self) -> None:
        """Kill whatever is left, wait until the cgroup is empty, read whether the kernel killed
        the run for memory, remove the cgroup."""
        kill = self.dir / "cgroup.kill"
        deadline = time.monotonic() + _END_WAIT_S
        while "populated 1" in (self.dir / "cgroup.events").read_text() and time.monotonic() < deadline:
            if kill.exists():
                kill.write_text("1")
            else:  # before Linux 5.14
                for pid in _words(self.dir / "cgroup.procs"):
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.002)
        events = dict(line.split() for line in (self.dir / "memory.events").read_text().splitlines())
        self.exceeded = int(events.get("oom_kill", 0)) > 0 or int(events.get("oom_group_kill", 0)) > 0
        for _ in range(100):
            try:
                self.dir.rmdir()
                return
            except OSError:  # busy for a moment after the last process is gone
                time.sleep(0.01)
        log.warning("could not remove the run's cgroup %s", self.dir)


# --- polling --------------------------------------------------------------------------------


def _field(text: bytes, name: bytes) -> bytes:
    """The first word after ``\nname:`` in a /proc status file (b"0" if absent)."""
    at = text.find(b"\n" + name + b":")
    if at == -1:
        return b"0"
    return text[at + len(name) + 2 : text.find(b"\n", at + 1)].split()[0]


def _status(pid: str) -> Optional[tuple[str, int]]:
    """(parent pid, resident anonymous + shared memory in bytes) of ``pid``, None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    kb = int(_field(text, b"RssAnon")) + int(_field(text, b"RssShmem"))
    return _field(text, b"PPid").decode(), kb << 10


def _proportional(pid: str, resident: int) -> int:
    """``pid``'s proportional anonymous + shared memory in bytes (pages shared with other
    processes count in part); ``resident`` when that cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:  # gone, or not ours to read (firejail's own processes as an ordinary user)
        return resident
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        if name in (b"Pss", b"Pss_Anon", b"Pss_Shmem"):
            fields[name] = int(rest.split()[0]) << 10
    if b"Pss_Anon" in fields:
        return fields[b"Pss_Anon"] + fields.get(b"Pss_Shmem", 0)
    return fields.get(b"Pss", resident)  # an older kernel: file pages count too


def _entries() -> set[str]:
    """The names in /proc: every process's pid, and a few files (which are never new)."""
    return set(os.listdir("/proc"))


class ProcessTree:
    """The processes descended from one root, found in /proc.

    Descendants cannot leave: in a PID namespace an orphan goes to the namespace's init, which
    descends from the root too. So a process is a member once its parent is one, for as long
    as it lives. Processes that existed before the run (``existing``) are never members; every
    other process is looked at once, when it first appears.
    """

    def __init__(self, existing: set[str]):
        self.members: set[str] = set()
        self.others = set(existing)

    def add_root(self, pid: int) -> None:
        self.members.add(str(pid))
        self.others.discard(str(pid))

    def resident(self) -> dict[str, int]:
        """Member pid -> resident bytes, for every live member."""
        live = _entries()
        self.others &= live
        self.members &= live
        out = {}
        for pid in self.members:
            st = _status(pid)
            if st is not None:
                out[pid] = st[1]
        new = {pid: st for pid in live - self.members - self.others if (st := _status(pid)) is not None}
        grew = True
        while grew:  # a new child of a new child: until nothing joins
            joined = [pid for pid, (ppid, _) in new.items() if ppid in self.members]
            for pid in joined:
                self.members.add(pid)
                out[pid] = new.pop(pid)[1]
            grew = bool(joined)
        self.others |= new.keys()
        return out


class PolledRun:
    """One run's limit by polling (see the module docstring)."""

    def __init__(self, memory_mb: int):
        self.limit = memory_mb * 2**20
        self.tree = ProcessTree(_entries())  # before the run starts: none of these is the run's
        self.exceeded = False

    def command(self, cmd: list[str]) -> list[str]:
        return cmd

    def started(self, pid: int) -> None:
        self.tree.add_root(pid)

    def over(self) -> bool:
        """True once the run's memory is above the limit (the caller kills it then)."""
        resident = self.tree.resident()
        if sum(resident.values()) > self.limit:
            total = 0  # the largest first, and no further than needed: every walk of a big process costs
            for pid, rss in sorted(resident.items(), key=lambda item: -item[1]):
                total += _proportional(pid, rss)
                if total > self.limit:
                    self.exceeded = True
                    break
        return self.exceeded

    def end(self) -> None:
        pass  # the caller kills the run's process group; the PID namespace takes the rest


RunLimit = Union[CgroupRun, PolledRun]


def open_run(memory_mb: int, max_procs: int) -> RunLimit:
    """The limit of one run that is about to start: a ``CgroupRun`` or a ``PolledRun``.

    Either: ``command(cmd)`` is what to start, ``started(pid)`` once it runs, ``over()``
    every ``POLL_S`` (True: kill the run), ``end()`` after the kill, then ``exceeded``.
    """
    m = mechanism()
    if m.kind == "cgroup":
        return CgroupRun(m.parent, memory_mb, max_procs)
    return PolledRun(memory_mb)
