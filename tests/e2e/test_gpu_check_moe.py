"""tools/gpu_check_moe.sh on a CPU: its tests marked gpu skip cleanly, and the MoE benchmark
accepts the flags the script passes (``GPU_CHECK_SMOKE=1``: the same commands at tiny sizes)."""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.jobs import run_job


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")
def test_gpu_check_moe_smoke_run_on_cpu(tmp_path):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=sys.executable, MOE_CHECK_BUDGET_S="600")
    r = run_job(["bash", "tools/gpu_check_moe.sh", str(tmp_path)], env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "moe_summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["moe_gpu_tests", "moe_sft_tiny-moe_64"]
    assert summary["ok"] and summary["smoke"] and all(s["rc"] == 0 for s in summary["steps"])
    bench = summary["benchmark"]
    assert bench["shape"] == "tiny-moe" and bench["tokens_per_s_per_device"] > 0
    assert bench["active_params"] < bench["params"]
    suite = ET.parse(tmp_path / "moe_gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == 2 and suite.get("skipped") == suite.get("tests")
