"""The start-up check of the rollout Python's torch against the trainer's, with real second Pythons:
the SGLang venv of the tests (``KLEAR_SGLANG_PYTHON``, tools/setup_env.sh: torch 2.13.0, the
trainer's) is accepted, and a venv with torch 2.14.1 (the torch SGLang 0.5.23 pins, PyPI's CUDA 13
build: NCCL 2.30.7, which its import reports without a GPU) is refused in one line naming both.

That venv is the real thing and not small: 5.4 GB, built once (229 s measured on a loaded 2-core
machine, 2026-12-07); it is kept
under ``$KLEAR_CACHE`` (default ~/.cache/megatron-klear) for later runs. No CPU build of another
torch is reachable from our machines (download.pytorch.org is not), and PyPI's Linux torch imports
only with its CUDA libraries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_klear.errors import ConfigError
from megatron_klear.inference.rollout_env import check_rollout_env, probe_torch, this_build
from megatron_klear.inference.sglang_servers import SGLangConfig
from tests.pypi import CACHE

SGLANG_TORCH = "2.14.1"  # what sglang==0.5.23 pins (tests/e2e/test_install.py checks it)


@pytest.fixture(scope="module")
def other_torch_python() -> str:
    """A venv whose torch is SGLang's 2.14.1 (built once into the cache)."""
    venv = CACHE / "side" / f"torch-{SGLANG_TORCH}-venv"
    python, stamp = venv / "bin" / "python", venv / "installed.txt"
    if not stamp.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"torch=={SGLANG_TORCH}"], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot install torch=={SGLANG_TORCH} here: {r.stderr.strip()[-300:]}")
        stamp.write_text(f"torch=={SGLANG_TORCH}\n")
    return str(python)


def test_the_rollout_pythons_torch_is_checked_at_start_up(other_torch_python):
    ours = this_build()
    same = os.environ.get("KLEAR_SGLANG_PYTHON")
    if same and Path(same).is_file():  # the tests' real SGLang venv: the trainer's torch
        for sg in [SGLangConfig(python=same), SGLangConfig(python=same, mode="distributed", nodes=1,
                                                             weight_sync_backend="gloo")]:  # fmt: skip
            assert check_rollout_env(sg, trainer_gpus_per_node=2).torch == ours.torch
    other = probe_torch(other_torch_python)
    assert other.torch.startswith(SGLANG_TORCH) and other.cuda and other.nccl, other
    for mode, extra, words in [
        ("colocated", {}, "CUDA IPC handles"),
        ("distributed", {"nodes": 1}, "the same NCCL"),  # this CPU torch has no NCCL at all
    ]:
        sg = SGLangConfig(python=other_torch_python, mode=mode, **extra)
        with pytest.raises(ConfigError) as e:
            check_rollout_env(sg, trainer_gpus_per_node=2)
        msg = str(e.value)
        assert f"rollout.sglang.python={other_torch_python} has torch {other.torch} (NCCL {other.nccl})" in msg
        assert f"the trainer torch {ours.torch} (NCCL {ours.nccl or 'none'})" in msg and words in msg, msg
    with pytest.raises(ConfigError, match="rollout.sglang.python=/nonexistent/python cannot be run"):
        check_rollout_env(SGLangConfig(python="/nonexistent/python"), trainer_gpus_per_node=2)
