"""A run's own output directory (lock, resume config, metrics rows), W&B's mode, console lines.

The lock tests use real processes as holders; the runs themselves are in tests/e2e/test_sft.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time

import pytest

from megatron_klear import console
from megatron_klear.errors import ConfigError, OutputDirError
from megatron_klear.training.metrics import wandb_mode
from megatron_klear.training.rundir import (
    FREE_KEYS,
    RunLock,
    check_resume_config,
    claim_output_dir,
    config_changes,
    truncate_rows,
)


def _hold(out: str, ready) -> None:
    lock = RunLock(out)
    lock.acquire()
    ready.set()
    time.sleep(60)


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of ``tmp_path``: (its pid, a function that kills it -9)."""
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(30)

    def kill() -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()

    yield proc.pid, kill
    if proc.is_alive():
        kill()


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, holder):
    pid, kill = holder
    with pytest.raises(OutputDirError, match=f"in use by another live run: PID {pid} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    with pytest.raises(OutputDirError, match=f"PID {pid}"):
        claim_output_dir(tmp_path)  # what every rank calls (here without a process group)
    kill()  # kill -9: the kernel drops its flock, its name stays in the file
    lock = RunLock(tmp_path)
    previous = lock.acquire()
    assert previous["pid"] == pid
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run.lock").read_text() == "" and RunLock(tmp_path).acquire() is None


def test_without_flock_the_named_holder_is_checked(tmp_path, monkeypatch):
    """Some cluster file systems have no flock (EOPNOTSUPP / ENOLCK). This test stands in for such
    a file system by making flock fail that way (the one thing a local disk cannot be made to
    do); the holder check behind it is the real one."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / "run.lock"
    host = socket.gethostname()
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": 0}))  # alive
    with pytest.raises(OutputDirError, match=f"PID {os.getppid()} on host {host}"):
        RunLock(tmp_path).acquire()
    lock_file.write_text(json.dumps({"pid": 12345, "host": "other-node", "started": 0}))  # cannot be checked
    with pytest.raises(OutputDirError, match=f"if it is dead, delete {lock_file}"):
        RunLock(tmp_path).acquire()
    dead = mp.get_context("fork").Process(target=sys.exit)
    dead.start()
    dead.join()
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": host, "started": 0}))
    assert RunLock(tmp_path).acquire()["pid"] == dead.pid


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match=f"output_dir {blocker / 'run'} is not writable"):
        claim_output_dir(blocker / "run")


def test_resume_refuses_a_changed_seed_model_or_data_but_not_free_keys(tmp_path):
    saved = {
        "output_dir": "/a",
        "seed": 1,
        "train_steps": 10,
        "model": {"hf": "/m"},
        "data": {"train": ["/d"], "cache_dir": "/c"},
        "log": {"interval": 1},
        "checkpoint": {"save_interval": 5},
    }
    free = json.loads(json.dumps(saved))
    free.update(output_dir="/moved", train_steps=20)
    free["log"]["interval"] = 7
    free["data"]["cache_dir"] = "/c2"
    free["checkpoint"]["save_interval"] = 2
    assert config_changes(saved, free) == [] and check_resume_config(saved, free, False, tmp_path) == []
    changed = json.loads(json.dumps(saved))
    changed.update(seed=2)
    changed["model"]["hf"] = "/other"
    changed["data"]["train"] = ["/d", "/e"]
    assert [k for k, *_ in config_changes(saved, changed)] == ["data.train", "model.hf", "seed"]
    with pytest.raises(ConfigError, match=r"cannot resume .* data.train: \['/d'\] -> \['/d', '/e'\]; model.hf"):
        check_resume_config(saved, changed, False, tmp_path)
    assert check_resume_config(saved, changed, True, tmp_path) == ["data.train", "model.hf", "seed"]
    assert check_resume_config(None, changed, False, tmp_path) == []  # nothing saved to compare with


def test_readme_lists_the_keys_a_resume_may_change():
    """README's list of free keys is FREE_KEYS, in order: a key added to one is added to both."""
    from tests.jobs import ROOT

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- FREE_KEYS -->"), readme.index("<!-- /FREE_KEYS -->")
    listed = [k.strip().strip("`") for k in readme[start + len("<!-- FREE_KEYS -->") : end].split(",")]
    assert listed == list(FREE_KEYS)


def test_rows_past_the_checkpoint_are_dropped(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(7)) + '{"step": 7, "lo')
    assert truncate_rows(log, 4) == 3  # steps 5, 6 and the torn line
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert truncate_rows(log, 4) == 0 and truncate_rows(tmp_path / "none.jsonl", 1) == 0
    assert truncate_rows(log, -1) == 5 and log.read_text() == ""  # a fresh start keeps nothing


def test_wandb_follows_its_own_environment(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"  # nothing configured: no network needed
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")  # what `wandb login` writes
    assert wandb_mode() is None
    netrc.write_text("")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # W&B reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode() is None


def test_console_lines_carry_time_and_rank_and_progress(capsys, monkeypatch):
    import io
    import re

    buf = io.StringIO()
    stream = console._Prefixed(buf, 3)
    stream.write("one\ntwo ")
    stream.write("still two\n")
    lines = buf.getvalue().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 3\] ", x) for x in lines)
    assert [x.split("] ", 1)[1] for x in lines] == ["one", "two still two"]

    monkeypatch.setenv(console.PROGRESS_ENV, "0")
    p = console.Progress("token cache of a.jsonl", unit="rows", of_what="the file")
    p.update(100, 0.25)
    p.finish()
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"token cache of a.jsonl: 100 rows \(25% of the file\), \d+ s elapsed, ~\d+ s left", out[0])
    assert out[1].startswith("token cache of a.jsonl: done, 100 rows in")
    with console.heartbeat("eval: generating", period=0.05):
        time.sleep(0.3)
    beats = capsys.readouterr().out.splitlines()
    assert len(beats) >= 2 and all(b.startswith("eval: generating: ") for b in beats)


_PARENT = """
import multiprocessing as mp, sys, threading, time
from megatron_klear.distributed import children_die_with_me
children_die_with_me()
ctx = mp.get_context("fork")
main_child = ctx.Process(target=time.sleep, args=(120,))
main_child.start()
box = []
t = threading.Thread(target=lambda: box.append(ctx.Process(target=time.sleep, args=(120,))) or box[0].start())
t.start(); t.join()  # forked from a thread that then ends: the child must live on
time.sleep(1.5)
print(main_child.pid, box[0].pid, int(box[0].is_alive()), flush=True)
time.sleep(120)
"""


def test_forked_children_die_with_their_parent():
    """A rank's forked helpers (Megatron's checkpoint writers) die when it is killed -9, whether
    they were forked by the main thread (PR_SET_PDEATHSIG) or by another (a PID watcher)."""
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        first, second, alive_after_thread_ended = map(int, parent.stdout.readline().split())
        assert alive_after_thread_ended == 1
        for pid in (first, second):
            os.kill(pid, 0)  # both alive while the parent lives
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        left = [first, second]
        while left and time.time() < deadline:
            left = [pid for pid in left if _alive(pid)]
            time.sleep(0.1)
        assert left == []
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped by init
        return f.read().split(")")[-1].split()[0] != "Z"
