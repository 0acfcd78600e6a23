"""Run untrusted programs with no network, no host IPC, a capped disk and hard limits.

Backends, in order of preference; both work as root and as an ordinary user:

* ``bwrap`` (bubblewrap), rootless: a new user namespace (nested ones disabled) with new PID,
  network, IPC, UTS and mount namespaces. The program sees only the system directories
  (``/usr``, ``/etc`` and the ``/bin``, ``/lib`` links) read-only, its own ``/proc`` and a
  minimal read-only ``/dev``, and two size-capped tmpfs mounts (``disk_mb`` each): ``/tmp``,
  which holds its home ``/tmp/home``, and ``/dev/shm``. Nothing else of the host: no ``/run``,
  ``/var``, ``/home``, no host socket files; the abstract socket namespace goes with the
  network namespace. As root, bwrap itself is started as an unprivileged uid from a pool
  (``setpriv``), so the program is never root on the host. Needs unprivileged user
  namespaces.
* ``firejail``: the same namespaces (``--net=none``; as an ordinary user ``--noroot``), nested
  namespaces blocked by seccomp, every top-level directory except the system ones hidden, as
  are the entries of ``/run``, other users' homes and the X11 / PulseAudio sockets that
  ``--private-tmp`` keeps from the host. firejail cannot size-cap a tmpfs, so here
  the whole filesystem is read-only: the program has no writable disk at all. As root the
  program runs as a pool uid (``setpriv``).

The run's memory limit (``memory_mb``) holds for all of its processes together, in resident
memory: a cgroup v2 of its own where one can be made, else a poller outside the sandbox that
kills the run over the limit (``memlimit``; the mechanism is logged once). Inside either
sandbox, rlimits (processes and threads, file size, no core dumps, an 8 MB stack, and an
address space per process of ``memory_mb`` plus a stack for each thread the run may have, as a
backstop) are set after the sandbox's user namespace exists, where the process count is the
run's own: a trainer with many threads does not use up a program's process allowance.
``MALLOC_ARENA_MAX=2`` keeps glibc from reserving 64 MB of address space per thread.

A shell supervisor inside the sandbox writes a start marker, runs the program, and fails a run
that leaves processes behind (exit code ``LEFT_PROCESSES``) and kills them, so that under
firejail too the run ends with the supervisor (bwrap's init is the supervisor). A program that
kills its supervisor under firejail and leaves a process runs to its time limit. A run whose
output lacks the marker never started: that raises ``SandboxError`` (backend and message),
never a failed test. A program cannot fake a failed start: the marker is out before the
program runs. Each backend is probed once per process with a test program
(``backend_problem``).

The program's time limit counts from the start marker: a slow sandbox start on a loaded
machine is not charged to the program (the start has ``START_TIMEOUT_S`` of its own).
Every run is its own process group: at the wall-time limit, over the memory limit, at the
output cap, on ``cancel`` or when the program exits, the whole group is killed and reaped; the
PID namespace takes any daemon the program left behind with it. The run's temporary files on the host are removed.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import pwd
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_klear.errors import ConfigError, SandboxError
from megatron_klear.rewards import memlimit

log = logging.getLogger(__name__)

BACKENDS = ("bwrap", "firejail", "unsafe-local")
_PREFERENCE = ("bwrap", "firejail")
_UID_BASE, _UID_SPAN = 200_000, 500_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

START_MARKER = b"@@MK_SANDBOX_STARTED@@\n"
LEFT_PROCESSES = 125  # exit code of a run that left processes behind
BWRAP_HOME = "/tmp/home"
_STDERR_CAP = 1 << 20
START_TIMEOUT_S = 30.0  # for the sandbox to start; the program's own limit counts from then
_CANCEL_POLL_S = 0.05
MIN_MEMORY_MB = 32  # a run's smallest memory limit: the sandbox and the interpreter need ~10 MB
THREAD_STACK_MB = 8  # the soft stack rlimit, which glibc takes as every thread's stack size
_MALLOC_ARENA_MB = 64  # address space of the one extra malloc arena that MALLOC_ARENA_MAX=2 allows
# Runs inside the sandbox as ``sh -c _SUPERVISOR sh HOST_NET HOST_PID PROGRAM...`` (the host's
# namespaces, ``_host_namespaces()``). It refuses to start in the host's network or PID
# namespace (a backend that fell back to no isolation), writes the start marker, runs the
# program, and fails the run if anything is left alive: the sandbox's init is pid 1 (under
# bwrap this shell itself) and $$ this shell. What is left it kills at once (``kill -1``: every
# process of the namespace it may signal), so that firejail, whose init waits for every
# process, ends now too; only where pid 1 is bwrap's (this shell) or firejail's init.
_SUPERVISOR = (
    'host_net=$1; host_pid=$2; shift 2; case "$(readlink /proc/self/ns/net /proc/self/ns/pid)" in '
    '*"$host_net"*|*"$host_pid"*) echo \'not isolated: running in a namespace of the host\' >&2; exit 126;; esac; '
    f"echo {START_MARKER.decode().strip()}; "
    '"$@"; rc=$?; '
    'for p in /proc/[0-9]*; do p=${p#/proc/}; [ "$p" = 1 ] || [ "$p" = $$ ] || { rc=L; break; }; done; '
    '[ "$rc" = L ] || exit $rc; read -r init < /proc/1/comm; if [ $$ = 1 ] || [ "$init" = firejail ]; then '
    "n=0; while [ $n -lt 100 ] && kill -9 -1 2>/dev/null; do n=$((n + 1)); done; fi; "
    f"exit {LEFT_PROCESSES}"
)
_SYSTEM_DIRS = ("/usr", "/etc")
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class ExecResult:
    """What happened to one run."""

    stdout: str
    stderr: str
    exit_code: Optional[int]
    timed_out: bool
    memory_exceeded: bool
    wall_s: float
    output_truncated: bool = False
    backend: str = ""
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (
            self.timed_out or self.memory_exceeded or self.output_truncated or self.cancelled
        )


def _is_root() -> bool:
    return os.geteuid() == 0


def _missing_tools(backend: str) -> list[str]:
    need = [backend, "prlimit"] + (["setpriv"] if _is_root() else [])
    return [t for t in need if not shutil.which(t)]


_problems: dict[tuple[str, int], Optional[str]] = {}
_probe_lock = threading.Lock()


def backend_problem(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run programs for this user here, or None when it can.

    Checked once per process and user: the tools must be installed and a test program must
    run through the sandbox and print its answer.
    """
    if backend == "unsafe-local":
        return None
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    key = (backend, os.geteuid())
    with _probe_lock:
        if key not in _problems:
            missing = _missing_tools(backend)
            _problems[key] = f"not installed: {', '.join(missing)}" if missing else _probe(backend)
        return _problems[key]


def _probe(backend: str) -> Optional[str]:
    try:
        r = _execute(backend, "print(6 * 7)", "", timeout_s=30.0, memory_mb=512, max_output_bytes=1024)
    except SandboxError as e:
        return str(e)
    if not r.ok or r.stdout.strip() != "42":
        return f"a test program failed in it (exit code {r.exit_code}): {r.stderr.strip()[-300:]!r}"
    return None


def available_backends() -> list[str]:
    """Sandbox backends that work for this user here, best first (never the unsafe one)."""
    return [b for b in _PREFERENCE if backend_problem(b) is None]


def default_backend() -> Optional[str]:
    b = available_backends()
    return b[0] if b else None


def resolve_backend(backend: Optional[str]) -> str:
    """``backend``, or the best working one; raises SandboxError naming each reason."""
    if backend is None:
        found = default_backend()
        if found is None:
            reasons = "; ".join(f"{b}: {backend_problem(b)}" for b in _PREFERENCE)
            raise SandboxError(
                f"no usable sandbox ({reasons}); refusing to run untrusted code. Install bubblewrap "
                "(needs unprivileged user namespaces) or firejail, or pass backend='unsafe-local' for "
                "trusted code only."
            )
        return found
    problem = backend_problem(backend)
    if problem is not None:
        raise SandboxError(f"sandbox backend {backend!r} cannot run programs here: {problem}")
    return backend


def sandbox_python() -> str:
    """An interpreter visible inside the sandbox (a system one: home directories are hidden)."""
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(p, os.X_OK):
            return p
    found = shutil.which("python3")
    if not found:
        raise SandboxError("no python3 interpreter found for the sandbox")
    return found


def _next_uid() -> int:
    with _uid_lock:
        n = next(_uid_counter)
    return _UID_BASE + (os.getpid() * 131 + n) % _UID_SPAN


def _drop_to(uid: int) -> list[str]:
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]


def _system_view() -> list[tuple[str, str]]:
    """(kind, path) for what the sandbox shows of the host: ("dir", p) or ("link", p)."""
    view = [("dir", d) for d in _SYSTEM_DIRS if os.path.isdir(d)]
    for p in _SYSTEM_LINKS:
        if os.path.islink(p):
            view.append(("link", p))
        elif os.path.isdir(p):
            view.append(("dir", p))
    real = os.path.realpath(sandbox_python())
    if not any(real.startswith(d + "/") for kind, d in view if kind == "dir"):
        view.append(("dir", str(Path(real).parents[1])))  # e.g. /opt/python: its whole prefix
    return view


@functools.lru_cache(maxsize=None)
def _bwrap_system_args() -> tuple[str, ...]:
    args: list[str] = []
    for kind, p in _system_view():
        args += ["--symlink", os.readlink(p), p] if kind == "link" else ["--ro-bind", p, p]
    return tuple(args)


def _bwrap(workdir: Path, inner: list[str], disk_mb: int) -> list[str]:
    size = str(disk_mb * 2**20)
    return [
        *(_drop_to(_next_uid()) if _is_root() else []),
        "bwrap",
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--as-pid-1",  # the supervisor is the namespace's init: no bwrap init left unreaped
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        *_bwrap_system_args(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        size,
        "--tmpfs",
        "/tmp",
        "--size",
        size,
        "--tmpfs",
        "/dev/shm",
        "--ro-bind",
        str(workdir / "main.py"),
        f"{BWRAP_HOME}/main.py",
        "--chdir",
        BWRAP_HOME,
        "--remount-ro",
        "/",
        "--remount-ro",
        "/dev",
        *inner,
    ]


def _firejail_home() -> str:
    return "/root" if _is_root() else pwd.getpwuid(os.geteuid()).pw_dir


def _reachable(path: str) -> bool:
    return os.access(path, os.X_OK if os.path.isdir(path) else os.R_OK)


def _firejail_hidden(home: str) -> list[str]:
    """Host paths to blacklist: everything but the system view, /proc, /dev, /tmp and the path
    to the home (firejail mounts the private home there).

    /run itself must stay (firejail keeps its state there), so its entries are hidden one by
    one; so are the siblings of every directory on the way to the home (other users' homes).
    Paths this user cannot reach need no hiding (and firejail refuses to blacklist them).
    """
    on_the_way = [str(p) for p in Path(home).parents if str(p) != "/"] + [home]
    keep = {p for _, p in _system_view()} | {"/proc", "/dev", "/tmp", "/run"} | set(on_the_way)
    hidden = [p for p in (os.path.join("/", n) for n in os.listdir("/")) if p not in keep]
    if os.path.isdir("/run"):
        hidden += [os.path.join("/run", n) for n in os.listdir("/run") if n != "firejail"]
    # --private-tmp keeps the host's X11 and PulseAudio sockets ("whitelisting" them).
    hidden += glob.glob("/tmp/.X11-unix") + glob.glob("/tmp/.ICE-unix") + glob.glob("/tmp/pulse-*")
    for parent in on_the_way[:-1]:  # e.g. /home: every entry but the one towards the home
        if os.access(parent, os.R_OK | os.X_OK):
            hidden += [p for p in (os.path.join(parent, n) for n in os.listdir(parent)) if p not in keep]
    return [p for p in hidden if _reachable(p)]


def _firejail(workdir: Path, inner: list[str], home: str) -> list[str]:
    if _is_root():
        # No --caps.drop here: setpriv needs CAP_SETUID to switch to the pool uid, and then
        # clears every capability itself.
        who = []
        inner = _drop_to(_next_uid()) + inner
    else:
        who = ["--noroot", "--caps.drop=all"]
    read_only = [p for kind, p in _system_view() if kind == "dir"] + ["/tmp", "/dev/shm", home]
    return [
        "firejail",
        "--quiet",
        "--noprofile",
        *who,
        "--nonewprivs",
        "--restrict-namespaces",
        "--deterministic-exit-code",  # the supervisor's exit code, not the last process's
        "--net=none",
        f"--private={workdir}",
        "--private-cwd",
        "--private-tmp",
        "--private-dev",
        *(f"--blacklist={p}" for p in _firejail_hidden(home)),
        *(f"--read-only={p}" for p in read_only),
        *inner,
    ]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class _Streams:
    stdout: bytearray
    stderr: bytearray
    stop: str = ""  # "", "timeout", "memory", "output", "cancelled"


class _Pipes:
    """The run's three pipes: stdin fed as the program reads it, stdout and stderr collected up
    to their caps (stderr past its cap is drained and dropped)."""

    def __init__(self, proc: subprocess.Popen, stdin: bytes, streams: _Streams, out_cap: int):
        self.sel = selectors.DefaultSelector()
        self.stdin_pipe, self.stdin, self.sent = proc.stdin, stdin, 0
        self.in_fd, self.out_fd = proc.stdin.fileno(), proc.stdout.fileno()
        self.caps = {self.out_fd: (streams.stdout, out_cap), proc.stderr.fileno(): (streams.stderr, _STDERR_CAP)}
        for fd in self.caps:
            self.sel.register(fd, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(self.in_fd, False)
            self.sel.register(self.in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()

    def reading(self) -> bool:
        """Whether stdout or stderr is still open."""
        return any(fd in self.sel.get_map() for fd in self.caps)

    def transfer(self, wait: float) -> bool:
        """Move what is ready within ``wait`` seconds; True if stdout got data."""
        got = False
        for key, _ in self.sel.select(wait):
            if key.fd == self.in_fd:
                try:
                    self.sent += os.write(self.in_fd, self.stdin[self.sent : self.sent + 65536])
                except OSError:  # the program closed its stdin
                    self.sent = len(self.stdin)
                if self.sent >= len(self.stdin):
                    self.sel.unregister(self.in_fd)
                    self.stdin_pipe.close()
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                self.sel.unregister(key.fd)
                continue
            buf, cap = self.caps[key.fd]
            buf += chunk[: max(0, cap - len(buf))]
            got |= key.fd == self.out_fd
        return got

    def drain_stdout(self) -> None:
        """What stdout holds now, without waiting (a run stopped before its marker was read)."""
        if self.out_fd not in self.sel.get_map():
            return
        os.set_blocking(self.out_fd, False)
        buf, cap = self.caps[self.out_fd]
        try:
            while len(buf) < cap and (chunk := os.read(self.out_fd, 65536)):
                buf += chunk[: cap - len(buf)]
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sel.close()
        if not self.stdin_pipe.closed:
            self.stdin_pipe.close()


def _pump(
    proc: subprocess.Popen,
    stdin: bytes,
    run_s: float,
    out_cap: int,
    marker: bytes,
    cancel: Optional[threading.Event],
    limit: Optional[memlimit.RunLimit] = None,
) -> _Streams:
    """Feed stdin and collect stdout/stderr until the run has ended (stdout and stderr closed,
    its first process exited) or a limit is hit.

    ``marker``: what stdout must start with once the sandbox has started (b"" unsandboxed).
    The program's ``run_s`` counts from then; until then the sandbox has START_TIMEOUT_S, so a
    loaded machine's slow start is never charged to the program. ``out_cap``: stdout bytes that
    mean "too much output" once reached. ``limit``: the run's memory limit
    (``memlimit.open_run``), asked every ``memlimit.POLL_S`` whether the run is over it.
    """
    s = _Streams(bytearray(), bytearray())
    pipes = _Pipes(proc, stdin, s, out_cap)
    started = not marker
    deadline = time.monotonic() + (run_s if started else START_TIMEOUT_S)
    next_check = time.monotonic() + memlimit.POLL_S if limit is not None else float("inf")
    try:
        while True:
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                s.stop = "cancelled"
            elif now >= deadline:
                s.stop = "timeout"
            elif now >= next_check:
                s.stop = "memory" if limit.over() else ""
                next_check = now + memlimit.POLL_S
            if s.stop:
                if not started:
                    pipes.drain_stdout()  # the marker may be there, unread
                return s
            wait = max(0.0, min(deadline, next_check) - now)
            if cancel is not None:
                wait = min(wait, _CANCEL_POLL_S)
            if not pipes.reading():
                if proc.poll() is not None:
                    return s
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
            elif pipes.transfer(wait):
                if not started and len(s.stdout) >= len(marker):
                    if not s.stdout.startswith(marker):
                        return s  # not our supervisor talking: the run is refused as a failed start
                    started, deadline = True, time.monotonic() + run_s
                if len(s.stdout) >= out_cap:
                    s.stop = "output"
                    return s
    finally:
        pipes.close()


def _host_namespaces() -> list[str]:
    """The network and PID namespaces of this process, as the supervisor's first arguments."""
    return [os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/pid")]


def address_space_mb(memory_mb: int, max_procs: int) -> int:
    """The address-space backstop of each process of a run: its memory limit, a stack for every
    thread it may have, and one extra malloc arena (a 64-thread pool needs about 600 MB)."""
    return memory_mb + max_procs * THREAD_STACK_MB + _MALLOC_ARENA_MB


def _rlimits(memory_mb: int, max_procs: int, max_file_mb: int) -> list[str]:
    """prlimit's arguments; the stack's soft limit only (a program may raise it for recursion)."""
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    stack = THREAD_STACK_MB * 2**20 if hard == resource.RLIM_INFINITY else min(THREAD_STACK_MB * 2**20, hard)
    return [
        "prlimit",
        f"--as={address_space_mb(memory_mb, max_procs) * 2**20}",
        f"--nproc={max_procs}",
        f"--fsize={max_file_mb * 2**20}",
        f"--stack={stack}:",
        "--core=0",
        "--",
    ]


def _execute(
    backend: str,
    source: str,
    stdin: str,
    *,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
    max_procs: int = 128,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    cancel: Optional[threading.Event] = None,
) -> ExecResult:
    """One run on a resolved backend (no availability check: the probe calls this too)."""
    workdir = Path(tempfile.mkdtemp(prefix="mk_sandbox_"))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "MALLOC_ARENA_MAX": "2"}
    try:
        prog = workdir / "main.py"
        prog.write_text(source)
        # The pool uid (root) reads the program; nothing in the directory is ever written.
        os.chmod(workdir, 0o755)
        os.chmod(prog, 0o644)
        if backend == "unsafe-local":
            cmd = [shutil.which("python3") or "python3", "-I", str(prog)]
            env["HOME"] = str(workdir)
            sandboxed, cwd = False, str(workdir)
        else:
            inner = [
                *_rlimits(memory_mb, max_procs, max_file_mb),
                "/bin/sh",
                "-c",
                _SUPERVISOR,
                "sh",
                *_host_namespaces(),
                sandbox_python(),
                "-I",
                "-S",
                "main.py",
            ]
            if backend == "bwrap":
                env["HOME"], cmd = BWRAP_HOME, _bwrap(workdir, inner, disk_mb)
            else:
                env["HOME"] = _firejail_home()
                cmd = _firejail(workdir, inner, env["HOME"])
            sandboxed, cwd = True, "/"
        limit = memlimit.open_run(memory_mb, max_procs)
        return _run(cmd, env, cwd, stdin, backend, sandboxed, timeout_s, max_output_bytes, cancel, limit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    cmd: list[str],
    env: dict,
    cwd: str,
    stdin: str,
    backend: str,
    sandboxed: bool,
    timeout_s: float,
    max_output_bytes: int,
    cancel: Optional[threading.Event],
    limit: Optional[memlimit.RunLimit] = None,
) -> ExecResult:
    """Start ``cmd`` (in ``limit``'s cgroup, if any), pump it, kill its group, make the result."""
    start = time.monotonic()
    marker = START_MARKER if sandboxed else b""
    try:
        proc = subprocess.Popen(
            limit.command(cmd) if limit is not None else cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        if limit is not None:
            limit.end()
        raise
    if limit is not None:
        limit.started(proc.pid)
    try:
        s = _pump(proc, stdin.encode(), timeout_s, max_output_bytes + len(marker) + 1, marker, cancel, limit)
    finally:
        # The program has ended (or must end now): take its whole group with it.
        _kill_group(proc)
        proc.wait()
        if limit is not None:
            limit.end()
        proc.stdout.close()
        proc.stderr.close()
    if limit is not None and limit.exceeded:
        s.stop = s.stop or "memory"  # the kernel's out-of-memory kill (cgroup)
    return _result(s, proc.returncode, backend, marker, max_output_bytes, time.monotonic() - start)


def _result(
    s: _Streams, returncode: int, backend: str, marker: bytes, max_output_bytes: int, wall: float
) -> ExecResult:
    """The run's ExecResult; SandboxError if a sandbox (``marker``) never started."""
    out, stderr = bytes(s.stdout), bytes(s.stderr).decode(errors="replace")
    if marker:
        if not out.startswith(marker):
            if s.stop == "cancelled":
                out = b""
            else:
                why = {
                    "timeout": f"no start within {START_TIMEOUT_S:.0f} s",
                    "memory": "it went over the memory limit before the program started",
                }.get(s.stop, f"exit code {returncode}")
                msg = stderr.strip()[-500:] or "no message"
                raise SandboxError(f"sandbox {backend!r} failed to start ({why}): {msg}")
        out = out[len(marker) :]
    truncated = s.stop == "output" or len(out) > max_output_bytes
    code = None if s.stop in ("timeout", "cancelled", "memory") else returncode
    memory = s.stop == "memory" or "MemoryError" in stderr or ("Cannot allocate" in stderr and (code or 0) != 0)
    return ExecResult(
        stdout=out[:max_output_bytes].decode(errors="replace"),
        stderr=stderr,
        exit_code=code,
        timed_out=s.stop == "timeout",
        memory_exceeded=memory,
        wall_s=wall,
        output_truncated=truncated,
        backend=backend,
        cancelled=s.stop == "cancelled",
    )


def run_program(
    source: str,
    stdin: str = "",
    *,
    timeout_s: float = 6.0,
    memory_mb: int = 1024,
    language: str = "python",
    backend: Optional[str] = None,
    max_output_bytes: int = 8 * 2**20,
    max_procs: int = 128,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    cancel: Optional[threading.Event] = None,
) -> ExecResult:
    """Run ``source`` with ``stdin`` in a sandbox and return what happened.

    Args:
        timeout_s: the program's wall-time limit, from the moment the sandbox has started
            (a start slower than START_TIMEOUT_S is a SandboxError); the whole process
            tree is killed at it.
        memory_mb: resident memory of the whole run, all its processes together (at least
            MIN_MEMORY_MB); over it the run is killed and reported ``memory_exceeded``.
            Each process also has an address-space backstop (``address_space_mb``).
        language: only ``"python"`` today.
        backend: ``"bwrap"``, ``"firejail"``, or ``"unsafe-local"`` (no isolation at all;
            only for trusted code). Default: the best working sandbox.
        max_output_bytes: stdout beyond this is cut off and the run is stopped.
        max_procs: processes and threads of the run (a 64-thread pool fits the default).
        max_file_mb: largest file the program may write.
        disk_mb: size of each writable tmpfs (bwrap: /tmp with the home, and /dev/shm).
        cancel: when set, the run is killed within ~50 ms and reported ``cancelled``.

    Raises:
        SandboxError: no working sandbox, or this run's sandbox failed to start (never a
            failed program).
    """
    if language != "python":
        raise ConfigError(f"language must be 'python', got {language!r}")
    if timeout_s <= 0 or disk_mb <= 0:
        raise ConfigError("timeout_s and disk_mb must be positive")
    if memory_mb < MIN_MEMORY_MB:
        raise ConfigError(
            f"memory_mb must be at least {MIN_MEMORY_MB} (the interpreter alone needs ~10 MB), got {memory_mb}"
        )
    backend = resolve_backend(backend)
    if backend == "unsafe-local":
        log.warning("UNSANDBOXED: running a program with no isolation (backend='unsafe-local')")
    return _execute(
        backend,
        source,
        stdin,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        max_procs=max_procs,
        max_file_mb=max_file_mb,
        disk_mb=disk_mb,
        cancel=cancel,
    )
