"""tools/gpu_check.py's plan for our GPU test machine (limits, memory estimates, what does not fit),
its kill of every process a timed-out step started, and ``--help`` of every shell tool. The whole
check on a CPU (smoke sizes) runs in tests/e2e/test_gpu_check.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.shapes import qwen3_config_dict
from megatron_klear.training.memory import logprob_kernel_memory, sft_memory
from tests.jobs import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

H100_FREE_GIB, H200_FREE_GIB = 78.0, 139.0


def test_plan_fits_the_gpu_test_machine(tmp_path):
    wheels = [Path(".whl/megatron_core-0.16.1-cp312.whl")]
    steps = gpu_check.plan(False, H100_FREE_GIB, tmp_path, wheels)
    names = [s.name for s in steps]
    assert names == ["install_wheels", "environment", "gpu_tests", "kernel_triton", "sft_0.6b_2048", "sft_0.6b_4096",
                     "sft_1.7b_4096_full_recompute", "sft_1.7b_8192_full_recompute", "gather",
                     "kernel_baselines"]  # fmt: skip
    assert sum(s.limit_s for s in steps) == gpu_check.BUDGET_S == 480  # the budget is the sum of the limits
    assert not [s.name for s in steps if s.skip]  # everything planned fits an H100 without TE
    sft = [s for s in steps if s.name.startswith("sft_")]
    assert all(s.label.startswith("torch-native attention") and s.estimate_gib < H100_FREE_GIB for s in sft)
    assert all("--recompute" in s.cmd for s in sft if "1.7b" in s.name)
    # what the old plan ran does not fit: 1.7B at 4K and 8K without recompute, and the eager
    # baseline at 32K x 152K
    hf = Qwen3Config.from_dict(qwen3_config_dict("1.7b"))
    assert 90 < sft_memory(hf, 4096).gib and sft_memory(hf, 8192).gib > H200_FREE_GIB
    assert 120 < logprob_kernel_memory(32768, 151936, "eager").gib
    base = steps[-1]
    assert base.cmd[base.cmd.index("--free-gib") + 1] == "78.0" and "1 of 12 do not" in base.note
    # a smaller GPU: the 4K torch-native step is skipped as "does not fit", not failed
    small = gpu_check.plan(False, 60.0, tmp_path, [])
    skipped = {s.name: s.skip for s in small if s.skip}
    assert list(skipped) == ["sft_0.6b_4096"] and skipped["sft_0.6b_4096"].startswith("does not fit: needs ~69.8 GiB")
    assert sum(s.limit_s for s in small) <= 480


def test_te_plan_for_a_machine_with_transformer_engine(tmp_path):
    one = gpu_check.plan(False, H100_FREE_GIB, tmp_path, [], te=True, gpus=1)
    two = gpu_check.plan(False, H100_FREE_GIB, tmp_path, [Path("x.whl")], te=True, gpus=2)
    assert [s.name for s in one] == ["environment", "gpu_tests", "sft_1.7b_4096", "sft_1.7b_4096_fp8_tensorwise",
                                     "sft_1.7b_4096_fp8_delayed", "sft_1.7b_16384_full_recompute"]  # fmt: skip
    assert [s.name for s in two][-1] == "sft_1.7b_8192_tp2_sp_fp8_tensorwise" and two[0].name == "install_wheels"
    assert sum(s.limit_s for s in two) <= gpu_check.BUDGET_S and not [s for s in two if s.skip]
    tp2 = two[-1].cmd
    assert tp2[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--sequence-parallel" in tp2
    assert tp2[tp2.index("--fp8-recipe") + 1] == "tensorwise" and all("Transformer Engine" in s.label for s in two[-5:])


def test_a_step_past_its_limit_loses_every_process_it_started(tmp_path):
    """The step starts a helper in a session of its own (as torchrun does with its workers) and
    hangs; after the limit neither is left."""
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print('helper', p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    step = gpu_check.Step("hangs", 3, [sys.executable, "-c", code])
    with open(tmp_path / "log", "wb") as log:
        t0 = time.time()
        result = gpu_check.run_step(step, dict(os.environ), log)
    assert result["timed_out"] and result["rc"] != 0 and time.time() - t0 < 60
    helper = int((tmp_path / "log").read_text().split("helper ")[1].split()[0])
    state = Path(f"/proc/{helper}/status")
    assert not state.exists() or "State:\tZ" in state.read_text(), "the helper outlived its step"


@pytest.mark.parametrize(
    "script",
    sorted(
        str(p.relative_to(ROOT))
        for p in [*ROOT.glob("tools/*.sh"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("slurm/*.sbatch")]
    ),  # fmt: skip
)
def test_every_shell_tool_answers_help(script, tmp_path):
    """``--help`` prints what the tool does and starts nothing (no venv, no job, no check)."""
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True)
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no venv's python: a tool that starts work would fail
    cmd = ["bash", str(ROOT / script), "--help"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2 and "Traceback" not in r.stdout + r.stderr, r.stdout
    assert not (tmp_path / "--help").exists() and not (ROOT / "--help").exists()
    after = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True)
    assert set(after.stdout.splitlines()) <= set(before.stdout.splitlines()), "--help wrote files"
