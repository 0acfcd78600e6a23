"""Random-initialised Qwen3 HF model directories (dense or Qwen3-MoE) for tests, benchmarks
and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_klear.data.tokenizer import build_tokenizer


@dataclass
class TinyModelArgs:
    """Shape of a tiny Qwen3 model (defaults: a few hundred thousand parameters)."""

    layers: int = 2  # transformer layers
    hidden: int = 64  # hidden size
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (GQA)
    head_dim: int = 32  # size of one attention head
    ffn: int = 128  # MLP intermediate size (a MoE model's dense layers)
    vocab: int = 512  # vocabulary size (our tiny tokenizer's is 512)
    tie_embeddings: bool = False  # share input embedding and output layer
    dtype: str = "float32"  # weights' dtype in the safetensors file
    max_positions: int = 4096  # max_position_embeddings
    seed: int = 0  # initialisation seed
    max_shard_size: str = "5GB"  # largest safetensors shard
    with_tokenizer: bool = True  # write our tiny tokenizer and chat template next to the weights
    moe: bool = False  # a Qwen3-MoE (Qwen3MoeForCausalLM) instead of a dense Qwen3
    experts: int = 8  # MoE: routed experts per sparse layer
    experts_per_tok: int = 2  # MoE: top-k
    moe_ffn: int = 32  # MoE: each expert's intermediate size
    norm_topk_prob: bool = True  # MoE: renormalise the top-k routing probabilities
    mlp_only_layers: list[int] = field(default_factory=list)  # MoE: dense layers among the sparse ones
    sparse_step: int = 1  # MoE: decoder_sparse_step (layer i has experts when (i + 1) % step == 0)
    # MoE: router weights' std x sqrt(hidden). Large: router logits of order this, so the
    # top-k of a token is decided by wide margins (no near-ties between implementations).
    router_scale: float = 4.0
    # RoPE scaling as in an HF config's rope_parameters, e.g. {rope_type: yarn, factor: 4.0,
    # original_max_position_embeddings: 16}; None: plain RoPE
    rope_scaling: Optional[dict] = None


def qwen3_hf_config(a: TinyModelArgs, tok=None):
    """The ``transformers`` config (``Qwen3Config`` or ``Qwen3MoeConfig``) for these arguments."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    ids = {}
    if tok is not None:
        ids = dict(
            bos_token_id=None,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        )
    common = dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        max_position_embeddings=a.max_positions,
        tie_word_embeddings=a.tie_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", **(a.rope_scaling or {}), "rope_theta": 1_000_000.0},
        dtype=a.dtype,
        **ids,
    )
    if not a.moe:
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)
    return Qwen3MoeConfig(
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=a.experts,
        num_experts_per_tok=a.experts_per_tok,
        moe_intermediate_size=a.moe_ffn,
        norm_topk_prob=a.norm_topk_prob,
        decoder_sparse_step=a.sparse_step,
        mlp_only_layers=list(a.mlp_only_layers),
        router_aux_loss_coef=0.001,
        **common,
    )


def _init_moe(model, a: TinyModelArgs) -> None:
    """Experts at unit gain (a wrong expert changes the logits visibly) and routers at
    ``router_scale`` (well-separated top-k)."""
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.normal_(0.0, a.router_scale / a.hidden**0.5)
        elif ".mlp.experts." in name:  # [E, out, in] (fused) or [out, in] (per expert)
            p.normal_(0.0, p.shape[-1] ** -0.5)


def make_tiny_model(out: str | Path, a: TinyModelArgs) -> Path:
    """Write an HF Qwen3 directory (config, safetensors, tokenizer) loadable offline."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(a.vocab, out) if a.with_tokenizer else None
    cfg = qwen3_hf_config(a, tok)
    torch.manual_seed(a.seed)
    dtype = getattr(torch, a.dtype)
    model = (Qwen3MoeForCausalLM if a.moe else Qwen3ForCausalLM)(cfg)
    with torch.no_grad():  # HF zero-inits nothing we care about, but make norms non-trivial
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        if a.moe:
            _init_moe(model, a)
    model.to(dtype).save_pretrained(str(out), safe_serialization=True, max_shard_size=a.max_shard_size)
    return out
