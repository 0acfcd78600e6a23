"""Launch training entry points under torchrun the way a job scheduler would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a launcher like a job scheduler does: its own session, output to files, and the
    whole process group killed once the launcher exits (a crashed rank can orphan helper
    processes, e.g. Megatron's checkpoint writers, which would hold a pipe open forever)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def torchrun(
    module: str,
    config: str,
    nproc: int,
    overrides: list[str],
    crash_at: str | None = None,
    expect_ok: bool = True,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m module --config config overrides``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEGATRON_KLEAR_CRASH_AT", None)
    if crash_at:
        env["MEGATRON_KLEAR_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    cmd += ["-m", module, "--config", str(ROOT / config), *overrides]
    r = run_job(cmd, env, timeout)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r
