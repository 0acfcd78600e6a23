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

Inside either, rlimits (address space, processes, file size, no core dumps) are set after the
sandbox's user namespace exists, where the process count is the run's own: a trainer with
many threads does not use up a program's process allowance.

A shell supervisor inside the sandbox writes a start marker, runs the program, and fails a run
that leaves processes behind (exit code ``LEFT_PROCESSES``). A run whose output lacks the
marker never started: that raises ``SandboxError`` (backend and message), never a failed test.
A program cannot fake a failed start: the marker is out before the program runs. Each backend
is probed once per process with a test program (``backend_problem``).

The program's time limit counts from the start marker: a slow sandbox start on a loaded
machine is not charged to the program (the start has ``START_TIMEOUT_S`` of its own).
Every run is its own process group: at the wall-time limit, at the output cap, on ``cancel``
or when the program exits, the whole group is killed and reaped; the PID namespace takes any
daemon the program left behind with it. The run's temporary files on the host are removed.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import pwd
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
# Runs inside the sandbox as ``sh -c _SUPERVISOR sh HOST_NET PROGRAM...``. It refuses to start
# in the host's network namespace (a backend that fell back to no isolation), writes the start
# marker, runs the program, and fails the run if anything is left alive: the sandbox's init
# is pid 1 (under bwrap this shell itself) and $$ this shell.
_SUPERVISOR = (
    'host_net=$1; shift; [ "$(readlink /proc/self/ns/net)" = "$host_net" ] && '
    "{ echo 'not isolated: running in the host network namespace' >&2; exit 126; }; "
    f"echo {START_MARKER.decode().strip()}; "
    '"$@"; rc=$?; '
    'for p in /proc/[0-9]*; do p=${p#/proc/}; [ "$p" = 1 ] || [ "$p" = $$ ] || exit '
    f"{LEFT_PROCESSES}; done; exit $rc"
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
    stop: str = ""  # "", "timeout", "output", "cancelled"


def _pump(
    proc: subprocess.Popen,
    stdin: bytes,
    run_s: float,
    out_cap: int,
    marker: bytes,
    cancel: Optional[threading.Event],
) -> _Streams:
    """Feed stdin and collect stdout/stderr until both close or a limit is hit.

    ``marker``: what stdout must start with once the sandbox has started (b"" unsandboxed).
    The program's ``run_s`` counts from then; until then the sandbox has START_TIMEOUT_S, so a
    loaded machine's slow start is never charged to the program. ``out_cap``: stdout bytes that
    mean "too much output" once reached.
    """
    s = _Streams(bytearray(), bytearray())
    out_fd = proc.stdout.fileno()
    caps = {out_fd: (s.stdout, out_cap), proc.stderr.fileno(): (s.stderr, _STDERR_CAP)}
    sel = selectors.DefaultSelector()
    for fd in caps:
        sel.register(fd, selectors.EVENT_READ)
    in_fd, sent = proc.stdin.fileno(), 0
    started = not marker
    deadline = time.monotonic() + (run_s if started else START_TIMEOUT_S)
    if stdin:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    try:
        while len(sel.get_map()) > (1 if in_fd in sel.get_map() else 0):
            if cancel is not None and cancel.is_set():
                s.stop = "cancelled"
                return s
            left = deadline - time.monotonic()
            if left <= 0:
                s.stop = "timeout"
                return s
            for key, _ in sel.select(min(left, _CANCEL_POLL_S) if cancel is not None else left):
                if key.fd == in_fd:
                    try:
                        sent += os.write(in_fd, stdin[sent : sent + 65536])
                    except OSError:  # the program closed its stdin
                        sent = len(stdin)
                    if sent >= len(stdin):
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf, cap = caps[key.fd]
                buf += chunk[: max(0, cap - len(buf))]  # stderr past its cap is drained and dropped
                if key.fd != out_fd:
                    continue
                if not started and len(buf) >= len(marker):
                    if not buf.startswith(marker):
                        return s  # not our supervisor talking: the run is refused as a failed start
                    started, deadline = True, time.monotonic() + run_s
                if len(buf) >= cap:
                    s.stop = "output"
                    return s
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.stop = "timeout"
        return s
    finally:
        sel.close()
        if not proc.stdin.closed:
            proc.stdin.close()


def _execute(
    backend: str,
    source: str,
    stdin: str,
    *,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
    max_procs: int = 32,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    cancel: Optional[threading.Event] = None,
) -> ExecResult:
    """One run on a resolved backend (no availability check: the probe calls this too)."""
    workdir = Path(tempfile.mkdtemp(prefix="mk_sandbox_"))
    try:
        prog = workdir / "main.py"
        prog.write_text(source)
        # The pool uid (root) reads the program; nothing in the directory is ever written.
        os.chmod(workdir, 0o755)
        os.chmod(prog, 0o644)
        if backend == "unsafe-local":
            cmd = [shutil.which("python3") or "python3", "-I", str(prog)]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(workdir)}
            sandboxed, cwd = False, str(workdir)
        else:
            inner = [
                "prlimit",
                f"--as={memory_mb * 2**20}",
                f"--nproc={max_procs}",
                f"--fsize={max_file_mb * 2**20}",
                "--core=0",
                "--",
                "/bin/sh",
                "-c",
                _SUPERVISOR,
                "sh",
                os.readlink("/proc/self/ns/net"),
                sandbox_python(),
                "-I",
                "-S",
                "main.py",
            ]
            if backend == "bwrap":
                home, cmd = BWRAP_HOME, _bwrap(workdir, inner, disk_mb)
            else:
                home = _firejail_home()
                cmd = _firejail(workdir, inner, home)
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": home}
            sandboxed, cwd = True, "/"
        return _run(cmd, env, cwd, stdin, backend, sandboxed, timeout_s, max_output_bytes, cancel)
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
) -> ExecResult:
    start = time.monotonic()
    marker = START_MARKER if sandboxed else b""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        s = _pump(proc, stdin.encode(), timeout_s, max_output_bytes + len(marker) + 1, marker, cancel)
    finally:
        # The program has ended (or must end now): take its whole group with it.
        _kill_group(proc)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wall = time.monotonic() - start
    out, stderr = bytes(s.stdout), bytes(s.stderr).decode(errors="replace")
    if sandboxed:
        if not out.startswith(START_MARKER):
            if s.stop == "cancelled":
                out = b""
            else:
                why = (
                    f"no start within {START_TIMEOUT_S:.0f} s"
                    if s.stop == "timeout"
                    else f"exit code {proc.returncode}"
                )
                msg = stderr.strip()[-500:] or "no message"
                raise SandboxError(f"sandbox {backend!r} failed to start ({why}): {msg}")
        out = out[len(marker) :]
    truncated = s.stop == "output" or len(out) > max_output_bytes
    code = None if s.stop in ("timeout", "cancelled") else proc.returncode
    return ExecResult(
        stdout=out[:max_output_bytes].decode(errors="replace"),
        stderr=stderr,
        exit_code=code,
        timed_out=s.stop == "timeout",
        memory_exceeded="MemoryError" in stderr or ("Cannot allocate" in stderr and (code or 0) != 0),
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
    max_procs: int = 32,
    max_file_mb: int = 16,
    disk_mb: int = 64,
    cancel: Optional[threading.Event] = None,
) -> ExecResult:
    """Run ``source`` with ``stdin`` in a sandbox and return what happened.

    Args:
        timeout_s: the program's wall-time limit, from the moment the sandbox has started
            (a start slower than START_TIMEOUT_S is a SandboxError); the whole process
            tree is killed at it.
        memory_mb: address-space limit of each process.
        language: only ``"python"`` today.
        backend: ``"bwrap"``, ``"firejail"``, or ``"unsafe-local"`` (no isolation at all;
            only for trusted code). Default: the best working sandbox.
        max_output_bytes: stdout beyond this is cut off and the run is stopped.
        max_procs: processes and threads of the run.
        max_file_mb: largest file the program may write.
        disk_mb: size of each writable tmpfs (bwrap: /tmp with the home, and /dev/shm).
        cancel: when set, the run is killed within ~50 ms and reported ``cancelled``.

    Raises:
        SandboxError: no working sandbox, or this run's sandbox failed to start (never a
            failed program).
    """
    if language != "python":
        raise ConfigError(f"language must be 'python', got {language!r}")
    if timeout_s <= 0 or memory_mb <= 0 or disk_mb <= 0:
        raise ConfigError("timeout_s, memory_mb and disk_mb must be positive")
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
