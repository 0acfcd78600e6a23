"""Shared fixtures: tiny Qwen3 HF models made by our own tool, converted once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Debug mode (megatron_klear.debug): every micro-batch's shape contract and every log-prob
# target are checked, in this process and in the jobs it starts.
os.environ.setdefault("MEGATRON_KLEAR_DEBUG", "1")
# Triton kernels run under the interpreter on CPU machines; must be set before triton loads.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_klear import known_warnings  # noqa: E402
from megatron_klear.checkpoint.convert import hf_to_megatron  # noqa: E402
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model  # noqa: E402

# name -> shape; covers GQA ratios 1 and 4, tied and untied embeddings.
TINY_MODELS = {
    "gqa1_untied": TinyModelArgs(heads=4, kv_heads=4, head_dim=16, tie_embeddings=False, seed=1),
    "gqa4_untied": TinyModelArgs(heads=8, kv_heads=2, head_dim=8, tie_embeddings=False, seed=2),
    "gqa1_tied": TinyModelArgs(heads=4, kv_heads=4, head_dim=16, tie_embeddings=True, seed=3),
    "gqa4_tied": TinyModelArgs(heads=8, kv_heads=2, head_dim=8, tie_embeddings=True, seed=4),
}


# Qwen3-MoE: a dense layer among sparse ones (mlp_only_layers), both norm_topk_prob settings,
# decoder_sparse_step 2, tied embeddings; routers at router_scale 4 (well-separated top-k).
MOE_MODELS = {
    "moe": TinyModelArgs(
        layers=4, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=64, moe=True, experts=8, mlp_only_layers=[2], seed=5
    ),
    "moe_nonorm_tied": TinyModelArgs(
        layers=4,
        hidden=32,
        heads=4,
        kv_heads=2,
        head_dim=8,
        ffn=64,
        moe=True,
        experts=4,
        norm_topk_prob=False,
        sparse_step=2,
        tie_embeddings=True,
        seed=6,
    ),
}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {name: make_tiny_model(root / name, args) for name, args in MOE_MODELS.items()}


@pytest.fixture(scope="session")
def moe_converted(moe_models, tmp_path_factory) -> dict[str, Path]:
    """Every tiny MoE model converted at EP=2 (each process writes half the experts)."""
    root = tmp_path_factory.mktemp("mg_moe")
    out = {}
    for name, d in moe_models.items():
        out[name] = root / name
        hf_to_megatron(str(d), str(out[name]), ep=2)
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_model(root / name, args) for name, args in TINY_MODELS.items()}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "unit: one process or spawned gloo ranks (tests/unit)")
    config.addinivalue_line("markers", "e2e: torchrun jobs, Slurm jobs, real servers (tests/e2e)")
    config.addinivalue_line(
        "markers", "real_sglang: drives a real SGLang server and sglang-router (installed by tools/test.sh)"
    )
    config.addinivalue_line("markers", "gpu: needs CUDA, skipped without it (tests/gpu, run by tools/gpu_check.sh)")
    for line in known_warnings.pytest_filters():  # the known third-party noise, as everywhere else
        config.addinivalue_line("filterwarnings", line)
    config.addinivalue_line(
        "markers",
        "multinode: Slurm jobs on a cluster of network-namespaced nodes (tools/local_slurm.sh start --nodes 2)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test by its folder, so ``-m unit`` / ``-m e2e`` / ``-m gpu`` select a tier;
    the ``gpu`` tier is skipped where CUDA is not available."""
    no_gpu = pytest.mark.skip(reason="needs CUDA (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("unit", "e2e", "gpu"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in parts and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory) -> dict[str, Path]:
    """Every tiny model converted at TP=2 x PP=2 (the hardest layout to write)."""
    root = tmp_path_factory.mktemp("mg")
    out = {}
    for name, d in hf_models.items():
        out[name] = root / name
        hf_to_megatron(str(d), str(out[name]), tp=2, pp=2)
    return out


@pytest.fixture(scope="session")
def input_ids(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 24), generator=g)
    p = tmp_path_factory.mktemp("ids") / "ids.json"
    p.write_text(json.dumps(ids.tolist()))
    return p, ids
