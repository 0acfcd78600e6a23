"""What a Qwen3 network is: the fields of an HF ``config.json``, read and checked.

No Megatron here: this is the model's identity, shared by the mapping, conversion, training
and the inference engines. Errors name the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_klear.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Qwen3Config:
    """The fields of an HF Qwen3 ``config.json`` that define the network."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "Qwen3Config":
        """Validate and read an HF config dict; errors name the file and the field."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type != "qwen3":
            raise ConfigError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"megatron-klear supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen3')"
            )
        if cfg.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not a Qwen3 layout")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={cfg['hidden_act']!r}; Qwen3 uses 'silu'")
        required = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads".split()
        for key in required:
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {cfg.get(key)!r}")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
        if dtype not in DTYPES:
            raise ConfigError(f"{source}: field 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype,
            raw=dict(cfg),
        )


def load_hf_config(model_dir: str | Path) -> Qwen3Config:
    """Read ``config.json`` from an HF model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json (is {model_dir} an HF model directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return Qwen3Config.from_dict(cfg, source=str(path))


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary padded to a multiple of ``divisible_by``, independent of TP.

    Padding must not depend on TP, or a checkpoint written at one TP would have a different
    embedding shape from the model at another. We therefore pad to ``divisible_by`` and
    require that result to split evenly over TP.
    """
    padded = -(-vocab_size // divisible_by) * divisible_by
    if padded % tp != 0:
        raise ConfigError(
            f"padded vocabulary {padded} (vocab {vocab_size} rounded up to {divisible_by}) does not split over tp={tp}"
        )
    return padded


def validate_parallel(cfg: Qwen3Config, tp: int, pp: int) -> None:
    """Check that TP divides the head counts and PP divides the layers, before any work."""
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"tp={tp} does not divide num_attention_heads={cfg.num_attention_heads}")
    if cfg.num_key_value_heads % tp:
        raise ConfigError(f"tp={tp} does not divide num_key_value_heads={cfg.num_key_value_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"num_key_value_heads={cfg.num_key_value_heads} does not divide "
            f"num_attention_heads={cfg.num_attention_heads}"
        )
    if cfg.intermediate_size % tp:
        raise ConfigError(f"tp={tp} does not divide intermediate_size={cfg.intermediate_size}")
    if cfg.num_hidden_layers % pp:
        raise ConfigError(f"pp={pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")
    padded_vocab_size(cfg.vocab_size, tp)
