"""HF-config shapes of the Qwen3 dense family, for random-weight benchmarks (no downloads)."""

from __future__ import annotations

from megatron_klear.errors import ConfigError

QWEN3_VOCAB = 151936

_QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=QWEN3_VOCAB,
    tie_word_embeddings=True,
)

QWEN3_SHAPES: dict[str, dict] = {
    "tiny": dict(
        _QWEN3_0_6B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
    # the real vocabulary on a small body: what a CPU can train at a few thousand tokens
    "small": dict(
        _QWEN3_0_6B,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    ),
    "0.6b": _QWEN3_0_6B,
    "1.7b": dict(_QWEN3_0_6B, hidden_size=2048, intermediate_size=6144),
    "8b": dict(
        _QWEN3_0_6B,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
}


def qwen3_config_dict(shape: str, dtype: str = "bfloat16", max_positions: int = 40960, **overrides) -> dict:
    """A complete HF ``config.json`` dict for a named shape."""
    if shape not in QWEN3_SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; known: {', '.join(QWEN3_SHAPES)}")
    cfg = dict(
        QWEN3_SHAPES[shape],
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        dtype=dtype,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
    )
    cfg.update(overrides)
    return cfg
