"""tools/gpu_check.sh on a CPU: its tests marked gpu skip cleanly, and every benchmark accepts
the flags the script passes (``GPU_CHECK_SMOKE=1``: the same commands at tiny sizes)."""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.jobs import run_job


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")
def test_gpu_check_smoke_run_on_cpu(tmp_path):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=sys.executable, GPU_CHECK_BUDGET_S="900")
    env.pop("TRITON_INTERPRET", None)  # the script's own environment, as on the GPU machine
    r = run_job(["bash", "tools/gpu_check.sh", str(tmp_path)], env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [s["name"] for s in summary["steps"]]
    assert names == [
        "environment",
        "gpu_tests",
        "kernel_triton",
        "sft_tiny_64",
        "gather",
        "kernel_baselines",
    ]
    assert summary["ok"] and summary["smoke"] and all(s["rc"] == 0 for s in summary["steps"])
    bench = summary["benchmarks"]
    assert sorted(bench) == ["gather", "kernel_baselines", "kernel_triton", "sft_tiny_64"]
    assert bench["sft_tiny_64"]["tokens_per_s_per_device"] > 0 and bench["gather"]["gb_per_s"] > 0
    suite = ET.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 5 and suite.get("skipped") == suite.get("tests")
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_tests.xml", "summary.json"]
