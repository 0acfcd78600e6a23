"""The tiny model the GPU tests share (tests/gpu/test_gpu.py and test_gpu_te.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

# FP8 GEMMs need every dimension a multiple of 16: hidden, FFN, heads x head_dim, KV heads x head_dim
TINY = TinyModelArgs(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=256, seed=3)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Path:
    """One HF checkpoint of ``TINY`` for every GPU test that compares against transformers."""
    return make_tiny_model(tmp_path_factory.mktemp("gpu") / "tiny", TINY)
