"""Launch training entry points under torchrun the way a job scheduler would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


JOB_MARK = "MEGATRON_KLEAR_TEST_JOB"  # every process of a job inherits it: how its orphans are found


def marked_processes(mark: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``JOB_MARK=mark``."""
    found, needle = [], f"{JOB_MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_job(cmd: list[str], env: dict, timeout: int = 300, orphan_grace_s: float = 0.0) -> subprocess.CompletedProcess:
    """Run a launcher like a job scheduler does: its own session, output to files, and every
    process of the job killed once the launcher exits (found by an environment mark: torchrun
    puts each worker in a session of its own, so the launcher's process group misses them).

    ``result.leftover`` lists the processes still alive ``orphan_grace_s`` seconds after the
    launcher exited, as ``(pid, command line)``: helpers that outlived their rank."""
    mark = uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=dict(env, **{JOB_MARK: mark}), stdout=out, stderr=err, start_new_session=True
        )
        leftover: list[tuple[int, str]] = []
        # SIGTERM to this process (a step limit of tools/gpu_check.sh, a CI timeout) unwinds
        # through ``finally``, which kills the job: its torchrun workers must not keep a GPU.
        main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main else None
        try:
            rc = proc.wait(timeout=timeout)
            deadline = time.time() + orphan_grace_s
            while marked_processes(mark) and time.time() < deadline:
                time.sleep(0.25)
            for pid in marked_processes(mark):
                try:
                    leftover.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
                except OSError:
                    pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in marked_processes(mark):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            if main:
                signal.signal(signal.SIGTERM, previous)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, rc, out.read(), err.read())
        result.leftover = leftover
        return result


def torchrun(
    module: str,
    config: str,
    nproc: int,
    overrides: list[str],
    crash_at: str | None = None,
    expect_ok: bool = True,
    timeout: int = 300,
    orphan_grace_s: float = 0.0,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m module --config config overrides`` (see
    ``run_job`` for ``orphan_grace_s`` and ``result.leftover``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEGATRON_KLEAR_CRASH_AT", None)
    if crash_at:
        env["MEGATRON_KLEAR_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    cmd += ["-m", module, "--config", str(ROOT / config), *overrides]
    r = run_job(cmd, env, timeout, orphan_grace_s)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r
