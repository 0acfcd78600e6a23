"""Transformer Engine on a GPU: skipped without CUDA, and without TE (our GPU test machine has none:
its core wheel is over the transfer limit). ``bash tools/gpu_check_te.sh OUTDIR`` runs these on a
machine that has TE, with the TE benchmarks.

* the Megatron model with TE's layer spec against HF transformers, forward and backward;
* SFT steps in FP8 with each recipe we expose (``model.fp8_recipe``: tensorwise, NVIDIA's default
  on Hopper with TE >= 2.2, and delayed with a long amax history): finite, learning, and within
  FP8 error of the bf16 run's losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_klear.distributed import spawn
from megatron_klear.models.qwen3 import have_transformer_engine
from tests.gpu.workers import model_fwd_bwd_worker
from tests.jobs import torchrun

pytestmark = pytest.mark.skipif(not have_transformer_engine(), reason="needs Transformer Engine")


def test_te_model_matches_hf_on_cuda(hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 96), generator=g)
    weights = torch.randn(2, 96, 512, generator=g)
    spawn(model_fwd_bwd_worker, 1, str(hf_model), ids, weights, str(tmp_path / "te.pt"), True)
    te = torch.load(tmp_path / "te.pt")
    hf = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).cuda()
    logits = hf(ids.cuda()).logits.float()
    (logits * weights.cuda()).sum().backward()
    # TE's fused kernels reorder float32 sums (and may use TF32): looser than the torch-native check
    assert torch.allclose(te["logits_float32"], logits.detach().cpu(), atol=2e-3, rtol=1e-3)
    assert torch.allclose(te["grad_final_norm"], hf.model.norm.weight.grad.cpu(), atol=1e-2, rtol=1e-2)


def _sft(root: Path, name: str, extra: list[str]) -> list[dict]:
    out = root / name
    torchrun(
        "megatron_klear.sft",
        "examples/tiny/sft.yaml",
        1,
        [f"output_dir={out}", f"model.hf={root / 'model'}", f"data.generate={root / 'data'}",
         "data.synthetic.n_math=1000", "data.synthetic.n_test=50", f"data.train=[{root / 'data' / 'sft.jsonl'}]",
         f"data.cache_dir={root / 'cache'}", "train_steps=30", "checkpoint.save_interval=30",
         "checkpoint.export_hf=false", "log.tensorboard=false", "model.params_dtype=bfloat16",
         "model.create_tiny={layers: 4, hidden: 128, heads: 4, kv_heads: 2, head_dim: 32, ffn: 256, vocab: 512}",
         *extra],
        timeout=300,
    )  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp8_sft_with_each_recipe_tracks_bf16(tmp_path):
    bf16 = _sft(tmp_path, "bf16", [])
    for recipe in ("tensorwise", "delayed"):
        rows = _sft(tmp_path, recipe, ["model.fp8=hybrid", f"model.fp8_recipe={recipe}"])
        losses = [r["loss"] for r in rows]
        assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses))), recipe
        assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), (recipe, losses)
        gap = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(rows, bf16))
        assert gap < 0.05, f"{recipe}: FP8 losses differ from bf16 by up to {gap:.1%}"
