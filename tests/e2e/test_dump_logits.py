"""tools/dump_logits.py under torchrun against HF transformers' logits."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.jobs import ROOT
from tests.references import hf_logits


def test_dump_logits_cli(converted, hf_models, input_ids, tmp_path):
    ids_path, ids = input_ids
    out = tmp_path / "l.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(ROOT / "tools/dump_logits.py"),
        "--load",
        str(converted["gqa1_untied"]),
        "--tp",
        "1",
        "--pp",
        "2",
        "--input-ids",
        str(ids_path),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    ref = hf_logits(hf_models["gqa1_untied"], ids)
    assert ((torch.load(out) - ref).norm() / ref.norm()).item() < 1e-4


def test_dump_logits_moe_tp2_ep2(moe_converted, moe_models, input_ids, tmp_path):
    """``--ep``: a Qwen3-MoE checkpoint written at EP=2 runs at TP=2 x EP=2 on 2 processes."""
    ids_path, ids = input_ids
    out = tmp_path / "l.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "tools/dump_logits.py")]
    cmd += ["--load", str(moe_converted["moe"]), "--tp", "2", "--ep", "2", "--input-ids", str(ids_path)]
    subprocess.run(cmd + ["--out", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=300)
    ref = hf_logits(moe_models["moe"], ids)
    assert ((torch.load(out) - ref).norm() / ref.norm()).item() < 1e-4
