"""Shared fixtures: tiny Qwen3 HF models made by our own tool, converted once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run under the interpreter on CPU machines; must be set before triton loads.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model  # noqa: E402

# name -> shape; covers GQA ratios 1 and 4, tied and untied embeddings.
TINY_MODELS = {
    "gqa1_untied": TinyModelArgs(heads=4, kv_heads=4, head_dim=16, tie_embeddings=False, seed=1),
    "gqa4_untied": TinyModelArgs(heads=8, kv_heads=2, head_dim=8, tie_embeddings=False, seed=2),
    "gqa1_tied": TinyModelArgs(heads=4, kv_heads=4, head_dim=16, tie_embeddings=True, seed=3),
    "gqa4_tied": TinyModelArgs(heads=8, kv_heads=2, head_dim=8, tie_embeddings=True, seed=4),
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_model(root / name, args) for name, args in TINY_MODELS.items()}
