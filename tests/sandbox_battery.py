"""The hostile programs of tests/test_rewards.py, run in-process (as root) or as a script (as an
ordinary user, through runuser): ``python tests/sandbox_battery.py BACKEND CTX_JSON`` prints
``{case: facts}`` as JSON.

Each case runs its program through the real scorer (``score_code``) and, where a fact needs it,
through ``run_program``, and reports facts: the score, whether it counted as correct, the
case's wall time, what the program managed (bytes written, ...), the peak memory of the run
as the host sees it (``HostPeak``), and the processes of the sandbox's uids still alive
afterwards. The test module asserts on the facts and checks the
host side (servers, victim files). Standard library only: an ordinary user may have only the
system python.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from megatron_klear.rewards.code import score_code
from megatron_klear.rewards.sandbox import run_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import sandbox_user  # noqa: E402

ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"
APPS = {"inputs": ["1 2", "3 4", "10 -3", "0 0"], "outputs": ["3", "7", "7", "0"]}
DISK_MB = 64  # the default per-run tmpfs cap under test


def fenced(code: str) -> str:
    return f"<think>plan</think>\nHere is the program:\n```python\n{code}\n```\n"


def scored(code: str, expected: str, backend: str, **kw) -> dict:
    """Score ``code`` against one test expecting ``expected`` (printed only if the attack worked)."""
    r = score_code(fenced(code), {"inputs": [""], "outputs": [expected]}, backend=backend, **kw)
    return {"score": r.score, "correct": r.correct, "reason": r.reason}


def network(ctx: dict, backend: str) -> dict:
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {ctx['tcp_port']}), timeout=2)\n"
        "s.send(b'hi')\nprint('connected')"
    )
    return scored(code, "connected", backend, timeout_s=3)


_CONNECT = """import socket
for addr in {addrs!r}:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(addr)
        s.send(b"hi")
        print("connected")
        break
    except OSError as e:
        pass
"""


def host_unix_socket(ctx: dict, backend: str) -> dict:
    return scored(_CONNECT.format(addrs=ctx["unix_paths"]), "connected", backend, timeout_s=3)


def abstract_socket(ctx: dict, backend: str) -> dict:
    return scored(_CONNECT.format(addrs=["\0" + ctx["abstract_name"]]), "connected", backend, timeout_s=3)


def files_outside(ctx: dict, backend: str) -> dict:
    code = (
        f"import os\nos.remove({ctx['victim']!r})\nopen({ctx['plant']!r}, 'w').write('x')\n"
        "open('/etc/mk_planted', 'w').write('x')\nprint('done')"
    )
    return scored(code, "done", backend)


def reads_secret(ctx: dict, backend: str) -> dict:
    return scored(f"print(open({ctx['secret_file']!r}).read())", ctx["secret_text"], backend)


_ENV = """import os
name = %r
found = os.environ.get(name)
for p in os.listdir("/proc"):
    try:
        entries = open(f"/proc/{p}/environ", "rb").read().split(b"\\0")
    except OSError:
        continue
    for e in entries:
        if e.startswith(name.encode() + b"="):
            found = e.split(b"=", 1)[1].decode()
print(found)
"""


def host_env(ctx: dict, backend: str) -> dict:
    """The scorer's environment holds a secret: neither os.environ nor /proc/*/environ shows it."""
    return scored(_ENV % ctx["env_name"], os.environ[ctx["env_name"]], backend)


def fork_bomb(ctx: dict, backend: str) -> dict:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    return scored(code, "never", backend, timeout_s=1.5)


def memory_bomb(ctx: dict, backend: str) -> dict:
    r = run_program("x = bytearray(8 * 1024**3)\nprint('allocated')", memory_mb=256, backend=backend)
    facts = scored("x = [0] * (4 * 1024**3)\nprint('allocated')", "allocated", backend, memory_mb=256)
    return {**facts, "memory_exceeded": r.memory_exceeded, "ok": r.ok}


def infinite_loop(ctx: dict, backend: str) -> dict:
    r = run_program("while True: pass", timeout_s=1, backend=backend)
    return {**scored("while True: pass", "x", backend, timeout_s=1), "timed_out": r.timed_out, "run_s": r.wall_s}


def prints_gigabytes(ctx: dict, backend: str) -> dict:
    flood = "import sys\nwhile True: sys.stdout.write('x' * 65536)"
    r = run_program(flood, max_output_bytes=1 << 20, timeout_s=20, backend=backend)
    facts = scored(flood, "x", backend)
    return {**facts, "truncated": r.output_truncated, "kept": len(r.stdout), "run_s": r.wall_s}


def kills_its_parent(ctx: dict, backend: str) -> dict:
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint('ok')"
    facts = scored(code, "never", backend)
    return {**facts, "next_score": score_code(fenced(ADD), APPS, backend=backend).score}


def sleeps_after_closing_stdout(ctx: dict, backend: str) -> dict:
    code = "import os, sys, time\nprint('42')\nsys.stdout.flush()\nos.close(1)\ntime.sleep(60)"
    return scored(code, "42", backend, timeout_s=1.5)


def daemon_that_outlives_it(ctx: dict, backend: str) -> dict:
    """The run ends when the program does (the case's time limit is 3 s, the daemon's sleep 1.5 s)."""
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1.5)\n"
        f"        open({ctx['daemon_marker']!r}, 'w').write('x')\n    os._exit(0)\nprint('42')"
    )
    t = time.monotonic()
    r = run_program(code, backend=backend, timeout_s=3)
    run_s = time.monotonic() - t
    return {**scored(code, "42", backend, timeout_s=3), "run_s": run_s, "exit_code": r.exit_code}


def fork_bomb_that_exits(ctx: dict, backend: str) -> dict:
    """A bomb whose starter returns at once: the run ends then (the supervisor's verdict), not
    at its 6 s time limit. 16 processes: a bomb of 128 takes the CPU that the starter needs to
    exit (``fork_bomb`` has the default limits)."""
    code = (
        "import os\nif os.fork() == 0:\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\nprint('42')"
    )
    t = time.monotonic()
    r = run_program(code, backend=backend, timeout_s=6, max_procs=16)
    run_s = time.monotonic() - t
    return {**scored(code, "42", backend, timeout_s=6, max_procs=16), "run_s": run_s, "exit_code": r.exit_code}


MEMORY_MB = 256  # the run's limit in the memory cases: small, the machine is shared


def forked_children(ctx: dict, backend: str) -> dict:
    """Eight children of 100 MB each under a 256 MB limit for the whole run."""
    peak = sandbox_user.HostPeak(tuple(ctx["uid_range"]))
    t = time.monotonic()
    try:
        r = run_program(sandbox_user.FORKED_CHILDREN, memory_mb=MEMORY_MB, backend=backend, timeout_s=10)
    finally:
        run_s = time.monotonic() - t
        peak_mb = peak.stop_mb()
    facts = scored(sandbox_user.FORKED_CHILDREN, "done", backend, memory_mb=MEMORY_MB, timeout_s=10)
    return {**facts, "memory_exceeded": r.memory_exceeded, "ok": r.ok, "run_s": run_s, "peak_mb": peak_mb}


_POOL = """import sys, threading
from concurrent.futures import ThreadPoolExecutor
a, b = map(int, sys.stdin.read().split())
everyone = threading.Barrier(64)
def part(x):
    everyone.wait(timeout=20)  # all 64 threads alive at once
    return x
with ThreadPoolExecutor(max_workers=64) as pool:
    print(sum(pool.map(part, [a, b] + [0] * 62)))
"""


def thread_pool_64(ctx: dict, backend: str) -> dict:
    """A legitimate solution with a 64-thread pool: 1.0 with the default limits, and with a
    256 MB memory limit."""
    small = score_code(fenced(_POOL), APPS, backend=backend, memory_mb=MEMORY_MB)
    r = score_code(fenced(_POOL), APPS, backend=backend)
    return {"score": r.score, "correct": r.correct, "reason": r.reason, "small_limit_score": small.score}


_FILL = """import json, os
chunk = b"x" * (8 << 20)
written = {}
for d in ["/tmp", "~", ".", "/var/tmp", "/dev/shm"]:
    n = 0
    try:
        for i in range(1280):  # 1280 x 8 MB = 10 GB
            with open(os.path.join(os.path.expanduser(d), f"fill{i}"), "wb") as f:
                n += f.write(chunk)
    except OSError as e:
        written[d] = [n, e.errno]
    else:
        written[d] = [n, 0]
print(json.dumps(written))
if sum(n for n, _ in written.values()) >= 10 << 30:
    print("done")
"""


def write_10gb(ctx: dict, backend: str) -> dict:
    r = run_program(_FILL, backend=backend, timeout_s=20)
    quiet = _FILL.replace("print(json.dumps(written))\n", "")  # prints "done" only after 10 GB
    facts = scored(quiet, "done", backend, timeout_s=20)
    return {**facts, "written": json.loads(r.stdout) if r.ok else r.stderr[-300:], "run_s": r.wall_s}


_SHM = """import json, mmap, os
try:
    fd = os.open("/dev/shm/mk_big", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 2 << 30)
    m = mmap.mmap(fd, 2 << 30)
    for i in range(0, 2 << 30, 1 << 20):
        m[i] = 1
    print(json.dumps({"touched": 2 << 30}))
except OSError as e:
    print(json.dumps({"error": e.errno}))
"""


def shm_2gb(ctx: dict, backend: str) -> dict:
    r = run_program(_SHM, backend=backend, memory_mb=4096, timeout_s=20)
    facts = scored(_SHM, '{"touched": 2147483648}', backend, memory_mb=4096, timeout_s=20)
    return {**facts, "exit_code": r.exit_code, "stdout": r.stdout[-200:], "run_s": r.wall_s}


def positive(ctx: dict, backend: str) -> dict:
    r = score_code(fenced(ADD), APPS, backend=backend)
    return {"score": r.score, "correct": r.correct, "reason": r.reason}


# name -> (case, the longest it may take in seconds, on a loaded 2-core machine)
CASES: dict[str, tuple[Callable[[dict, str], dict], float]] = {
    "network": (network, 10),
    "host_unix_socket": (host_unix_socket, 10),
    "abstract_socket": (abstract_socket, 10),
    "files_outside": (files_outside, 10),
    "reads_secret": (reads_secret, 10),
    "host_env": (host_env, 10),
    "fork_bomb": (fork_bomb, 10),
    "fork_bomb_that_exits": (fork_bomb_that_exits, 15),
    "memory_bomb": (memory_bomb, 10),
    "forked_children": (forked_children, 15),
    "infinite_loop": (infinite_loop, 10),
    "prints_gigabytes": (prints_gigabytes, 15),
    "kills_its_parent": (kills_its_parent, 10),
    "sleeps_after_closing_stdout": (sleeps_after_closing_stdout, 10),
    "daemon_that_outlives_it": (daemon_that_outlives_it, 10),
    "write_10gb": (write_10gb, 20),
    "shm_2gb": (shm_2gb, 20),
    "positive": (positive, 10),
    "thread_pool_64": (thread_pool_64, 10),
}


def processes_of(uids: Callable[[int], bool], exclude: set) -> list[int]:
    """Live pids whose real uid satisfies ``uids``. Zombies do not count: they are dead, and
    reaping them is their new parent's job (a killed sandbox's init goes to the host's pid 1)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if fields["State"].split()[0] != "Z" and uids(int(fields["Uid"].split()[0])):
            found.append(int(entry))
    return found


def run_case(name: str, ctx: dict, backend: str, uids: Callable[[int], bool], exclude: set) -> dict:
    """One case's facts, with ``wall_s`` and ``left``: processes of the sandbox's uids still
    alive 5 s after the case (a PID namespace's processes go within milliseconds)."""
    case, _ = CASES[name]
    t = time.monotonic()
    facts = case(ctx, backend)
    facts["wall_s"] = time.monotonic() - t
    deadline = time.monotonic() + 5
    while (left := processes_of(uids, exclude)) and time.monotonic() < deadline:
        time.sleep(0.1)
    facts["left"] = left
    return facts


def main() -> None:
    backend, ctx = sys.argv[1], json.loads(sys.argv[2])
    me = os.getuid()
    exclude = {os.getpid(), os.getppid()}
    names = ctx.get("cases") or list(CASES)
    print(json.dumps({n: run_case(n, ctx, backend, lambda u: u == me, exclude) for n in names}))


if __name__ == "__main__":
    main()
