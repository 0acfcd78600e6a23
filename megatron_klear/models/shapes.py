"""HF-config shapes of the Qwen3 family (dense, and Qwen3-MoE: ``tiny-moe``, ``30b-a3b``), for
random-weight benchmarks (no downloads)."""

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

# Qwen3-30B-A3B's config.json fields (48 layers, 128 experts of width 768, top-8)
_QWEN3_30B_A3B = dict(
    _QWEN3_0_6B,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)
QWEN3_SHAPES["30b-a3b"] = _QWEN3_30B_A3B
# two of its layers (1.9B parameters with the embeddings): one GPU's benchmark of its MoE layer
QWEN3_SHAPES["30b-a3b-2l"] = dict(_QWEN3_30B_A3B, num_hidden_layers=2)
# the tiny dense shape with 8 experts of width 32 (top-2) in every layer: the CPU benchmarks'
QWEN3_SHAPES["tiny-moe"] = dict(
    QWEN3_SHAPES["tiny"], num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.001
)


def qwen3_config_dict(shape: str, dtype: str = "bfloat16", max_positions: int = 40960, **overrides) -> dict:
    """A complete HF ``config.json`` dict for a named shape."""
    if shape not in QWEN3_SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; known: {', '.join(QWEN3_SHAPES)}")
    moe = "num_experts" in QWEN3_SHAPES[shape]
    cfg = dict(
        QWEN3_SHAPES[shape],
        architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        model_type="qwen3_moe" if moe else "qwen3",
        dtype=dtype,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
    )
    cfg.update(overrides)
    return cfg
