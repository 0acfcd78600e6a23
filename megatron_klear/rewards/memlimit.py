"""The memory limit of a whole sandbox run: all of its processes together, in resident memory.

A per-process address-space limit lets a run of N processes take N times the limit; these
mechanisms limit the run. One is picked per process and user (``mechanism()``, logged once
with why the better ones are not used), in this order:

* ``cgroup2``: where a cgroup v2 subtree with the memory and pids controllers is writable
  (root, or a user slice delegated by systemd), every run gets a cgroup of its own under
  ``<parent>/megatron-klear-<pid>``: ``memory.max`` (the limit), ``memory.swap.max=0``,
  ``memory.oom.group=1`` (an out-of-memory kill takes the whole run) and ``pids.max``.
  The parent is the nearest ancestor of this process's cgroup whose ``cgroup.subtree_control``
  already enables memory and pids (nothing of the host's cgroup setup is changed).
* ``cgroup1``: otherwise, where the memory controller is on a cgroup v1 hierarchy and this
  process's own memory cgroup is writable (root, or a cgroup delegated to the user, e.g. by
  ``cgcreate -a USER -t USER``), every run gets a memory cgroup of its own under it:
  ``memory.limit_in_bytes`` (the limit) and ``memory.memsw.limit_in_bytes`` (the same: no
  swap; where swap is not accounted, ``memory.swappiness=0`` instead). v1 has no group kill,
  so the run is ended at its first out-of-memory kill (the ``oom_kill`` counter of
  ``memory.oom_control``, read every ``POLL_S``). Where this process's v1 pids cgroup is
  writable too, the run gets a pids cgroup with ``pids.max`` beside it; else the per-user
  process rlimit alone limits processes.
* ``poll``: otherwise the thread that runs the sandbox calls ``PolledRun.over`` every
  ``POLL_S``: it sums the resident memory (RssAnon + RssShmem) of the run's process tree,
  found in /proc from the process it started; above the limit it sums the proportional set
  sizes instead (pages that forked copies share count once, as a cgroup counts them), and
  above the limit by that measure too the run is killed. Best effort: between two polls a run
  can grow by what it can touch in ``POLL_S``; it does not see files in the run's tmpfs (each
  capped at ``disk_mb`` separately), nor System V shared memory or memfd files that no process
  maps (both go when the run ends). The address-space rlimit on each process stays as a
  backstop.

With a cgroup, the run's first process (a shell started by this process) moves itself in
before it starts the sandbox (``echo 0 > cgroup.procs``, then ``exec``), so the run and
everything it starts are inside and nothing else is (never the trainer). The kernel enforces
the limit exactly and counts all of the run's memory: anonymous, shared, its tmpfs files, page
cache. Each run's cgroups are removed when it ends (killed, timed out, or on an exception).
Either way a run over its limit ends as "memory exceeded". ``MEGATRON_KLEAR_SANDBOX_MEMORY``
(``auto``, the default; ``cgroup``: v2 or v1; ``cgroup2``; ``cgroup1``; ``poll``) forces a
mechanism; a forced one that cannot be used here is a SandboxError that says why.
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
CHOICES = ("auto", "cgroup", "cgroup2", "cgroup1", "poll")
MACHINERY_PIDS = 16  # pids.max beyond max_procs: bwrap / firejail and the supervisor shell
_CONTROLLERS = ("memory", "pids")
_END_WAIT_S = 5.0


@dataclass(frozen=True)
class Mechanism:
    """How runs are limited: ``kind`` "cgroup2" (runs' cgroups go under ``parent``), "cgroup1"
    (runs' memory cgroups under ``parent``, their pids cgroups under ``pids_parent`` if any) or
    "poll". ``why``: why the better mechanisms are not used."""

    kind: str
    parent: Optional[Path] = None
    pids_parent: Optional[Path] = None
    why: str = ""

    @property
    def is_cgroup(self) -> bool:
        """Whether the kernel enforces the limit (a cgroup of either version)."""
        return self.kind in ("cgroup2", "cgroup1")

    def describe(self) -> str:
        if self.kind == "cgroup2":
            return (
                f"cgroup v2, a cgroup per run under {self.parent} "
                "(memory.max, memory.swap.max=0 where swap is accounted, memory.oom.group=1, pids.max)"
            )
        if self.kind == "cgroup1":
            pids = f", pids.max in a pids cgroup per run under {self.pids_parent}" if self.pids_parent else ""
            return (
                f"cgroup v1, a memory cgroup per run under {self.parent} (memory.limit_in_bytes, "
                "memory.memsw.limit_in_bytes where swap is accounted, else memory.swappiness=0, the run ended "
                "at its first "
                f"out-of-memory kill){pids}; not cgroup v2 because {self.why}"
            )
        return (
            f"polling: the summed resident memory of each run's process tree, every {POLL_S * 1e3:.0f} ms; "
            f"no cgroup because {self.why}"
        )


_mechanisms: dict[tuple[int, str], Mechanism] = {}
_lock = threading.Lock()


def mechanism() -> Mechanism:
    """The mechanism for this process and user (found once, then logged once at INFO).

    Raises SandboxError for a bad ``MEGATRON_KLEAR_SANDBOX_MEMORY`` or a forced cgroup
    mechanism that cannot be used here.
    """
    choice = os.environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise SandboxError(f"{ENV}={choice!r}: must be one of {CHOICES}")
    key = (os.geteuid(), choice)
    with _lock:
        if key not in _mechanisms:
            found = Mechanism("poll", why=f"{ENV} is poll") if choice == "poll" else _find(choice)
            if choice not in ("auto", "poll") and found.kind == "poll":
                raise SandboxError(f"{ENV}={choice}, but no such cgroup is usable here: {found.why}")
            _mechanisms[key] = found
            log.info("sandbox memory limit per run: %s", found.describe())
        return _mechanisms[key]


def _find(choice: str) -> Mechanism:
    """The best mechanism that ``choice`` allows ("auto", "cgroup", "cgroup2", "cgroup1"):
    a cgroup one, or "poll" with the reasons why none of those can be used."""
    reasons, not_v2 = [], f"{ENV} is {choice}"
    if choice in ("auto", "cgroup", "cgroup2"):
        found = _find_cgroup2()
        if isinstance(found, Mechanism):
            return found
        reasons.append(f"cgroup v2: {found}")
        not_v2 = found
    if choice in ("auto", "cgroup", "cgroup1"):
        found = _find_cgroup1(not_v2)
        if isinstance(found, Mechanism):
            return found
        reasons.append(f"cgroup v1: {found}")
    return Mechanism("poll", why="; ".join(reasons))


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _mounted(own: str, fs_type: str, option: Optional[str]) -> Optional[tuple[Path, Path]]:
    """(mount point, ``own``'s directory) on the mounted ``fs_type`` file system that holds the
    cgroup path ``own`` (for cgroup v1: the one whose mount options include ``option``)."""
    for line in _lines("/proc/self/mountinfo"):
        fields, _, fs = line.partition(" - ")
        parts, fs = fields.split(), fs.split()
        if fs[:1] != [fs_type] or (option is not None and option not in fs[2].split(",")):
            continue
        rel = os.path.relpath(own, parts[3])
        if not rel.startswith(".."):
            return Path(parts[4]), (Path(parts[4]) / rel).resolve()
    return None


def _own_cgroup(controller: Optional[str]) -> Optional[str]:
    """This process's cgroup path in the v1 hierarchy of ``controller`` (None: in the v2 one)."""
    for line in _lines("/proc/self/cgroup"):
        num, ctrls, path = line.split(":", 2)
        if (controller is None and num == "0") or (controller is not None and controller in ctrls.split(",")):
            return path
    return None


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK) and os.access(d / "cgroup.procs", os.W_OK)


def joined(procs: list[Path], cmd: list[str]) -> list[str]:
    """``cmd``, started by a shell that first moves itself into each cgroup (``procs``: their
    cgroup.procs files) and then becomes ``cmd``: the run and nothing else is in them."""
    moves = " && ".join(f'echo 0 > "${i}"' for i in range(len(procs)))
    return ["/bin/sh", "-c", f'{moves} && shift {len(procs) - 1} && exec "$@"', *map(str, procs), *cmd]


def _probe(run: Union[Cgroup2Run, Cgroup1Run]) -> None:
    """Start /bin/true in ``run``'s cgroups and remove them: SandboxError if it cannot join."""
    try:
        r = subprocess.run(run.command(["/bin/true"]), capture_output=True, text=True, timeout=30)
    finally:
        run.end()
    if r.returncode != 0:
        raise SandboxError(f"a process could not join the run's cgroup: {r.stderr.strip()[-200:]}")


def _remove_dirs(dirs: list[Path]) -> None:
    """rmdir each cgroup (busy for a moment after its last process is gone)."""
    for d in dirs:
        for _ in range(100):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            log.warning("could not remove the run's cgroup %s", d)


def _kill_all(procs: Path) -> bool:
    """SIGKILL every process in a cgroup.procs file; False once it is empty."""
    pids = _words(procs)
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return bool(pids)


def _empty(dirs: list[Path]) -> None:
    """Kill every process in the cgroups ``dirs`` until they are empty (at most ``_END_WAIT_S``)."""
    deadline = time.monotonic() + _END_WAIT_S
    while any([_kill_all(d / "cgroup.procs") for d in dirs]) and time.monotonic() < deadline:
        time.sleep(0.002)


def end_cgroups(dirs: list[Path]) -> None:
    """Kill every process in the cgroups ``dirs``, then remove them (children first)."""
    _empty(dirs)
    _remove_dirs(dirs)


_run_ids = itertools.count()


def _run_name() -> str:
    return f"run-{os.getpid()}-{next(_run_ids)}"


# --- cgroup v2 ------------------------------------------------------------------------------


def _find_cgroup2() -> Union[Mechanism, str]:
    """The nearest usable ancestor of this process's v2 cgroup, probed with a real cgroup, or
    why there is none."""
    own_path = _own_cgroup(None)
    if own_path is None:
        return "this process is in no cgroup v2 hierarchy"
    found = _mounted(own_path, "cgroup2", None)
    if found is None:
        return "no cgroup2 file system is mounted"
    mount, own = found
    if "memory" not in _words(mount / "cgroup.controllers"):
        return f"the cgroup v2 hierarchy at {mount} has no memory controller (cgroup v1 holds it)"
    reasons = []
    for cand in [own, *own.parents]:
        if mount not in (cand, *cand.parents):
            break
        missing = [c for c in _CONTROLLERS if c not in _words(cand / "cgroup.subtree_control")]
        if missing:
            reasons.append(f"{cand} does not enable {'/'.join(missing)} for its children")
            continue
        if not _writable(cand):
            reasons.append(f"{cand} is not writable by uid {os.geteuid()}")
            continue
        try:
            return Mechanism("cgroup2", parent=_make_subtree(cand))
        except (OSError, SandboxError) as e:
            reasons.append(f"{cand}: {e}")
    return "no usable cgroup v2 subtree: " + "; ".join(reasons or ["none found"])


def _make_subtree(parent: Path) -> Path:
    """``parent/megatron-klear-<pid>`` with memory and pids enabled for its children, checked
    by moving a shell into a limited child cgroup; removed at exit."""
    sub = parent / f"megatron-klear-{os.getpid()}"
    sub.mkdir(exist_ok=True)
    try:
        (sub / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CONTROLLERS))
        _probe(Cgroup2Run(sub, memory_mb=64, max_procs=4))
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


class Cgroup2Run:
    """One run's v2 cgroup: made and limited at construction, joined by ``command``'s first
    process, killed and removed by ``end``."""

    def __init__(self, parent: Path, memory_mb: int, max_procs: int):
        self.dir = parent / _run_name()
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
        return joined([self.dir / "cgroup.procs"], cmd)

    def started(self, pid: int) -> None:
        pass

    def over(self) -> bool:
        return False  # the kernel enforces the limit and kills the whole run (memory.oom.group)

    def end(self) -> None:
        """Kill whatever is left, wait until the cgroup is empty, read whether the kernel killed
        the run for memory, remove the cgroup."""
        kill = self.dir / "cgroup.kill"
        deadline = time.monotonic() + _END_WAIT_S
        while "populated 1" in (self.dir / "cgroup.events").read_text() and time.monotonic() < deadline:
            if kill.exists():
                kill.write_text("1")
            else:  # before Linux 5.14
                _kill_all(self.dir / "cgroup.procs")
            time.sleep(0.002)
        events = dict(line.split() for line in (self.dir / "memory.events").read_text().splitlines())
        self.exceeded = int(events.get("oom_kill", 0)) > 0 or int(events.get("oom_group_kill", 0)) > 0
        _remove_dirs([self.dir])


# --- cgroup v1 ------------------------------------------------------------------------------


def cgroup1_dir(controller: str) -> Union[Path, str]:
    """This process's cgroup directory in the v1 hierarchy of ``controller``, or why none."""
    own = _own_cgroup(controller)
    if own is None:
        return f"this process is in no cgroup v1 {controller} hierarchy"
    found = _mounted(own, "cgroup", controller)
    if found is None:
        return f"no cgroup v1 {controller} hierarchy is mounted"
    return found[1]


def _find_cgroup1(not_v2: str) -> Union[Mechanism, str]:
    """cgroup v1 runs under this process's own memory (and, if writable, pids) cgroups,
    probed with a real run, or why that cannot be. ``not_v2``: why cgroup v2 is not used."""
    memory = cgroup1_dir("memory")
    if isinstance(memory, str):
        return memory
    if not _writable(memory):
        return f"this process's memory cgroup {memory} is not writable by uid {os.geteuid()}"
    pids = cgroup1_dir("pids")
    if isinstance(pids, Path) and not _writable(pids):
        pids = f"this process's pids cgroup {pids} is not writable by uid {os.geteuid()}"
    _remove_stale(memory, pids)
    if isinstance(pids, Path):
        try:
            _probe(Cgroup1Run(memory, pids, memory_mb=64, max_procs=4))
            return Mechanism("cgroup1", parent=memory, pids_parent=pids, why=not_v2)
        except (OSError, SandboxError) as e:
            pids = f"a run could not use a pids cgroup under {pids}: {e}"
    try:
        _probe(Cgroup1Run(memory, None, memory_mb=64, max_procs=4))
    except (OSError, SandboxError) as e:
        return f"{memory}: {e}"
    return Mechanism("cgroup1", parent=memory, why=f"{not_v2} (and no pids cgroup: {pids})")


def _remove_stale(*parents: Union[Path, str]) -> None:
    """Remove the empty v1 run cgroups that a trainer killed outright left under ``parents``:
    those of processes no longer alive (their names hold the pid). Never one with a process."""
    for parent in parents:
        if isinstance(parent, Path):
            for d in parent.glob("megatron-klear-run-*-*"):
                pid = d.name.split("-")[3]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and not _words(d / "cgroup.procs"):
                    try:
                        d.rmdir()
                    except OSError:
                        pass


# Idle v1 run cgroups, reused: on a loaded machine a process in a memory cgroup made just for
# it started slower than in one used before (python -I -S -c pass: 26 vs 20 ms at a load average
# of 8; on a quiet machine the same, 6.8 ms), and making and removing one is work saved.
# (parent, pids parent) -> names of empty run cgroups; removed at exit, or by the next trainer
# (``_remove_stale``) if this one is killed outright.
_idle: dict[tuple[Path, Optional[Path]], list[str]] = {}
_idle_lock = threading.Lock()


def release_idle() -> None:
    """Remove the idle (empty) v1 run cgroups of this process (done at exit)."""
    with _idle_lock:
        idle = [(key, name) for key, names in _idle.items() for name in names]
        _idle.clear()
    _remove_dirs([d / name for (parent, pids), name in idle for d in (parent, pids) if d is not None])


atexit.register(release_idle)


class Cgroup1Run:
    """One run's v1 memory cgroup (and pids cgroup, where ``pids_parent`` is given): an idle one
    of this process's or a new one, limited at construction, joined by ``command``'s first
    process, ended at its first out-of-memory kill (``over``), emptied by ``end`` and kept for
    the next run (removed at exit)."""

    def __init__(self, parent: Path, pids_parent: Optional[Path], memory_mb: int, max_procs: int):
        self.key, self.exceeded = (parent, pids_parent), False
        with _idle_lock:
            idle = _idle.get(self.key)
            self.name = idle.pop() if idle else f"megatron-klear-{_run_name()}"
        self.memory = parent / self.name
        self.dirs = [d / self.name for d in (parent, pids_parent) if d is not None]
        try:
            for d in self.dirs:
                d.mkdir(exist_ok=True)
            self._limit(memory_mb * 2**20, max_procs + MACHINERY_PIDS)
            self.kills_before = self._oom_kills()
        except OSError as e:
            _remove_dirs(self.dirs)
            raise SandboxError(f"cannot make or limit the run's cgroup under {parent}: {e}") from e

    def _limit(self, limit: int, pids_max: int) -> None:
        mem, memsw = self.memory / "memory.limit_in_bytes", self.memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # memory + swap may never be below memory: lower memory first, raise it last
            files = [mem, memsw] if limit <= int(mem.read_text()) else [memsw, mem]
        else:
            files = [mem]
            try:  # swap is not accounted: at least keep the run's pages out of swap (best effort)
                (self.memory / "memory.swappiness").write_text("0")
            except OSError:
                pass
        for f in files:
            f.write_text(str(limit))
        if len(self.dirs) == 2:
            (self.dirs[1] / "pids.max").write_text(str(pids_max))

    def command(self, cmd: list[str]) -> list[str]:
        return joined([d / "cgroup.procs" for d in self.dirs], cmd)

    def started(self, pid: int) -> None:
        pass

    def _oom_kills(self) -> int:
        fields = dict(line.split() for line in _lines(str(self.memory / "memory.oom_control")) if " " in line)
        return int(fields.get("oom_kill", 0))

    def over(self) -> bool:
        """True once the kernel has killed a process of the run for memory (v1 kills only one:
        the caller ends the rest)."""
        self.exceeded = self.exceeded or self._oom_kills() > self.kills_before
        return self.exceeded

    def end(self) -> None:
        """Kill whatever is left, wait until the cgroups are empty, read whether the kernel killed
        a process of the run for memory; keep the cgroups for the next run (removed if a process
        would not go)."""
        _empty(self.dirs)
        self.over()  # after the last process: a kill at the very end counts too
        if any(_words(d / "cgroup.procs") for d in self.dirs):
            _remove_dirs(self.dirs)  # logs a warning
            return
        with _idle_lock:
            _idle.setdefault(self.key, []).append(self.name)


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
            new_members = [pid for pid, (ppid, _) in new.items() if ppid in self.members]
            for pid in new_members:
                self.members.add(pid)
                out[pid] = new.pop(pid)[1]
            grew = bool(new_members)
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


RunLimit = Union[Cgroup2Run, Cgroup1Run, PolledRun]


def open_run(memory_mb: int, max_procs: int) -> RunLimit:
    """The limit of one run that is about to start: a ``Cgroup2Run``, ``Cgroup1Run`` or
    ``PolledRun`` (``mechanism()``).

    Either: ``command(cmd)`` is what to start, ``started(pid)`` once it runs, ``over()``
    every ``POLL_S`` (True: kill the run), ``end()`` after the kill, then ``exceeded``.
    """
    m = mechanism()
    if m.kind == "cgroup2":
        return Cgroup2Run(m.parent, memory_mb, max_procs)
    if m.kind == "cgroup1":
        return Cgroup1Run(m.parent, m.pids_parent, memory_mb, max_procs)
    return PolledRun(memory_mb)
