"""Run untrusted programs with no network, a private filesystem view and hard limits.

Backends, in order of preference:

* ``firejail``: new PID/mount/network namespaces (``--net=none``), a private home and /tmp,
  the rest of the filesystem read-only; rlimits on address space, processes and file size.
* ``bwrap`` (bubblewrap): the same picture with ``--unshare-all`` and a read-only root.

Inside either, the program runs as an unprivileged uid (``setpriv``), with every capability
dropped: root would ignore the process limit, so a fork bomb would not be contained. Each
run gets its own uid from a pool, so one program's processes never count against another's
limit. If no backend is installed we refuse to run untrusted code unless the caller passes
``backend="unsafe-local"``, which logs a loud warning.

Every run is its own process group: at the wall-time limit, at the output cap or when the
program exits, the whole group is killed and reaped; the PID namespace takes any daemon
the program left behind with it.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

BACKENDS = ("firejail", "bwrap", "unsafe-local")
_UID_BASE, _UID_SPAN = 200_000, 500_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


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

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.memory_exceeded or self.output_truncated)


def available_backends() -> list[str]:
    """Sandbox backends installed on this machine (the unsafe one is never listed)."""
    found = []
    if shutil.which("firejail") and shutil.which("setpriv"):
        found.append("firejail")
    if shutil.which("bwrap") and shutil.which("setpriv") and shutil.which("prlimit"):
        found.append("bwrap")
    return found


def default_backend() -> Optional[str]:
    b = available_backends()
    return b[0] if b else None


def sandbox_python() -> str:
    """An interpreter visible inside the sandbox (outside /root, which is made private)."""
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(p, os.X_OK):
            return p
    found = shutil.which("python3")
    if not found:
        raise RuntimeError("no python3 interpreter found for the sandbox")
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


def _command(
    backend: str,
    workdir: Path,
    argv: list[str],
    timeout_s: float,
    memory_mb: int,
    max_procs: int,
    max_file_mb: int,
    uid: int,
) -> list[str]:
    mem = memory_mb * 2**20
    fsize = max_file_mb * 2**20
    if backend == "firejail":
        # No firejail --timeout: its watchdog adds ~2 s to every run; our deadline kills the group.
        return (
            [
                "firejail",
                "--quiet",
                "--noprofile",
                "--net=none",
                f"--private={workdir}",
                "--private-tmp",
                "--private-dev",
                "--read-only=/",
                f"--rlimit-as={mem}",
                f"--rlimit-nproc={max_procs}",
                f"--rlimit-fsize={fsize}",
            ]
            + _drop_to(uid)
            + argv
        )
    if backend == "bwrap":
        home = "/tmp/sandbox"  # under the fresh /tmp: the read-only root has no room for it
        return (
            [
                "bwrap",
                "--ro-bind",
                "/",
                "/",
                "--tmpfs",
                "/tmp",
                "--tmpfs",
                "/root",
                "--tmpfs",
                "/home",
                "--bind",
                str(workdir),
                home,
                "--chdir",
                home,
                "--setenv",
                "HOME",
                home,
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
                "--die-with-parent",
                "--new-session",
                "prlimit",
                f"--as={mem}",
                f"--nproc={max_procs}",
                f"--fsize={fsize}",
                "--",
            ]
            + _drop_to(uid)
            + [argv[0], "-I", "-S", "-c", _SUPERVISOR]
            + argv
        )
    return argv


# Runs inside a bwrap sandbox around the program: bwrap tears the PID namespace down as soon
# as the program exits, so a program that leaves a daemon behind would look successful.
# This supervisor fails such a run (exit code LEFT_PROCESSES) instead.
LEFT_PROCESSES = 125
_SUPERVISOR = (
    "import os, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "left = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]\n"
    f"sys.exit({LEFT_PROCESSES} if left else rc)\n"
)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_capped(stream, cap: int, sink: list, flag: dict) -> None:
    total = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return
        if total < cap:
            sink.append(chunk[: cap - total])
        total += len(chunk)
        if total > cap:
            flag["over"] = True
            return


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
) -> ExecResult:
    """Run ``source`` with ``stdin`` in a sandbox and return what happened.

    Args:
        timeout_s: wall-time limit; the whole process tree is killed at it.
        memory_mb: address-space limit of each process.
        language: only ``"python"`` today.
        backend: ``"firejail"``, ``"bwrap"``, or ``"unsafe-local"`` (no isolation at all;
            only for trusted code). Default: the best installed sandbox; an error if none.
        max_output_bytes: stdout beyond this is cut off and the run is stopped.
    """
    if language != "python":
        raise ValueError(f"language must be 'python', got {language!r}")
    if backend is None:
        backend = default_backend()
        if backend is None:
            raise RuntimeError(
                "no sandbox installed (firejail or bubblewrap with setpriv); refusing to run untrusted code. "
                "Install firejail, or pass backend='unsafe-local' for trusted code only."
            )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "unsafe-local" and backend not in available_backends():
        raise RuntimeError(f"sandbox backend {backend!r} is not installed")
    if backend == "unsafe-local":
        log.warning("UNSANDBOXED: running a program with no isolation (backend='unsafe-local')")
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")

    uid = _next_uid()
    workdir = Path(tempfile.mkdtemp(prefix="mk_sandbox_"))
    try:
        prog = workdir / "main.py"
        prog.write_text(source)
        if backend != "unsafe-local":
            # firejail wants the private home owned by the caller; the sandbox uid needs to
            # write in it, and it is this run's own directory.
            os.chmod(workdir, 0o777)
            os.chmod(prog, 0o644)
        interp = sandbox_python() if backend != "unsafe-local" else shutil.which("python3") or "python3"
        target = "main.py" if backend != "unsafe-local" else str(prog)
        argv = [interp, "-I", "-S", target] if backend != "unsafe-local" else [interp, "-I", target]
        cmd = _command(backend, workdir, argv, timeout_s, memory_mb, max_procs, max_file_mb, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(workdir)}
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
        out, err, flag_out, flag_err = [], [], {}, {}
        readers = [
            threading.Thread(target=_read_capped, args=(proc.stdout, max_output_bytes, out, flag_out), daemon=True),
            threading.Thread(target=_read_capped, args=(proc.stderr, 1 << 20, err, flag_err), daemon=True),
        ]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = False
        deadline = start + timeout_s
        while proc.poll() is None:
            if flag_out.get("over"):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.005)
        # The program's own process has ended (or must end now): take its whole group with it.
        _kill_group(proc)
        proc.wait()
        wall = time.monotonic() - start
        for t in readers:
            t.join(timeout=2)
        for s in (proc.stdout, proc.stderr):
            s.close()
        stderr = b"".join(err).decode(errors="replace")
        code = proc.returncode
        memory_exceeded = "MemoryError" in stderr or (code is not None and code < 0 and "Cannot allocate" in stderr)
        return ExecResult(
            stdout=b"".join(out).decode(errors="replace"),
            stderr=stderr,
            exit_code=None if timed_out else code,
            timed_out=timed_out,
            memory_exceeded=memory_exceeded,
            wall_s=wall,
            output_truncated=bool(flag_out.get("over")),
            backend=backend,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
