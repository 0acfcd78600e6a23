"""tools/gpu_check.sh on a CPU (``GPU_CHECK_SMOKE=1``: the same steps at tiny sizes): its tests
marked gpu skip cleanly, every benchmark accepts the flags the plan passes, and everything it
writes lands in the folder it is given. The plan for the GPU machine is checked in
tests/unit/test_gpu_check_plan.py."""

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
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    env.update(GPU_CHECK_SMOKE="1", PYTHON=sys.executable)  # the script's own environment, as on the GPU machine
    r = run_job(["bash", "tools/gpu_check.sh", str(out)], env, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["environment", "gpu_tests", "kernel_triton", "sft_tiny_64", "gather", "kernel_baselines"]
    assert summary["ok"] and summary["smoke"] and all(s["result"]["status"] == "ok" for s in steps.values())
    assert all(s["estimate_gib"] > 0 and s["note"] for n, s in steps.items() if n not in ("environment", "gpu_tests"))
    bench = summary["benchmarks"]
    assert sorted(bench) == ["gather", "kernel_baselines", "kernel_triton", "sft_tiny_64"]
    assert bench["sft_tiny_64"]["tokens_per_s_per_device"] > 0 and bench["gather"]["gb_per_s"] > 0
    assert [row["status"] for row in bench["kernel_baselines"]["rows"]] == ["ok"]
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 5 and suite.get("skipped") == suite.get("tests")
    log = (out / "gpu_check.log").read_text()
    assert "plan: 6 steps" in log and "=== sft_tiny_64 (limit" in log and "memory ~" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_tests.xml", "summary.json"]
    assert not (tmp_path / "runs").exists()
