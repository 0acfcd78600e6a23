"""Qwen3-MoE checks that need a GPU (``tools/gpu_check_moe.sh`` runs them on our GPU test
machine; one GPU, so expert parallel 1: the all-to-all dispatcher's own path on CUDA, the
sequential experts, the load-balancing loss, the gather of GPU tensors, SFT steps).
Every test carries the ``gpu`` marker and is skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_klear.distributed import spawn
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from tests.gpu.moe_workers import moe_cuda_worker
from tests.jobs import torchrun

TINY_MOE = TinyModelArgs(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=256, moe=True, experts=8,
                         moe_ffn=64, mlp_only_layers=[2], seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gpu_moe") / "moe", TINY_MOE)


def test_moe_model_matches_hf_on_cuda(moe_model, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (2, 96), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "mg.pt"
    spawn(moe_cuda_worker, 1, str(moe_model), ids, str(out))
    mg = torch.load(out)
    assert mg["device"].startswith("cuda")
    hf = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32).cuda()
    with torch.no_grad():
        ref = hf(ids.cuda()).logits.float().cpu()
    rel = ((mg["logits_float32"] - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    lp16, lp32 = mg["logits_bfloat16"].log_softmax(-1), ref.log_softmax(-1)
    assert (lp16 - lp32).abs().mean() < 5e-2
    disk = load_file(moe_model / "model.safetensors")
    assert sorted(mg["tensors"]) == sorted(disk) and all(torch.equal(mg["tensors"][n], disk[n]) for n in disk)
    assert mg["router_grad"].abs().sum() > 0


def test_moe_sft_steps_on_cuda(tmp_path):
    """examples/tiny/sft.yaml with a tiny Qwen3-MoE on one GPU: the loss falls and the router's
    load-balancing loss is logged every step."""
    args = {k: v for k, v in TINY_MOE.__dict__.items() if k in ("layers", "hidden", "experts", "moe_ffn")}
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in {**args, "moe": "true", "heads": 4, "kv_heads": 2}.items()) + "}"
    out = tmp_path / "sft"
    torchrun(
        "megatron_klear.sft",
        "examples/tiny/sft.yaml",
        1,
        [f"output_dir={out}", f"model.hf={tmp_path / 'model'}", f"model.create_tiny={tiny}",
         f"data.generate={tmp_path / 'data'}", f"data.train=[{tmp_path / 'data' / 'sft.jsonl'}]",
         f"data.cache_dir={tmp_path / 'cache'}", "train_steps=20", "log.tensorboard=false",
         "checkpoint.export_hf=false"],
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert sum(r["loss"] for r in rows[-4:]) < 0.8 * sum(r["loss"] for r in rows[:4])
    assert all(0.5 < r["moe/load_balancing_loss"] < 8.0 for r in rows)
