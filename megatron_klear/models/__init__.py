"""Qwen3 family on Megatron-Core."""

from megatron_klear.models.qwen3 import (  # noqa: F401
    ModelOptions,
    Qwen3Config,
    build_model,
    load_hf_config,
    padded_vocab_size,
    validate_parallel,
)
