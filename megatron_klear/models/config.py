"""What a Qwen3 network is: the fields of an HF ``config.json``, read and checked.

No Megatron here: this is the model's identity, shared by the mapping, conversion, training
and the inference engines. Errors name the file and the field.

Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B) is the same network with a routed
mixture of experts in place of the MLP of its sparse layers (``MoEConfig``); settings of that
family we cannot reproduce exactly are refused, naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURE, MOE_MODEL_TYPE = "Qwen3MoeForCausalLM", "qwen3_moe"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts fields of a Qwen3-MoE ``config.json``."""

    num_experts: int  # routed experts per sparse layer
    num_experts_per_tok: int  # top-k
    moe_intermediate_size: int  # each expert's SwiGLU width
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not listed here (those are dense)
    router_aux_loss_coef: float = 0.001  # the model's load-balancing loss coefficient

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has experts (transformers' rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


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
    moe: Optional[MoEConfig] = None  # Qwen3-MoE; None: dense Qwen3

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) is a mixture-of-experts layer."""
        return self.moe is not None and self.moe.is_sparse(layer)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "Qwen3Config":
        """Validate and read an HF config dict; errors name the file and the field."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type not in ("qwen3", MOE_MODEL_TYPE):
            raise ConfigError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"megatron-klear supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen3', 'qwen3_moe')"
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
            moe=read_moe(cfg, source) if MOE_ARCHITECTURE in archs or model_type == MOE_MODEL_TYPE else None,
        )


def _require_int(cfg: dict, key: str, source: str, minimum: int) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{source}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def read_moe(cfg: dict, source: str) -> MoEConfig:
    """The ``MoEConfig`` of a Qwen3-MoE config dict; settings we cannot reproduce exactly are
    refused, naming the key. transformers 5 writes ``num_local_experts`` for ``num_experts``."""
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg = dict(cfg, num_experts=cfg["num_local_experts"])
    experts = _require_int(cfg, "num_experts", source, 1)
    top_k = _require_int(cfg, "num_experts_per_tok", source, 1)
    width = _require_int(cfg, "moe_intermediate_size", source, 1)
    step = _require_int(cfg, "decoder_sparse_step", source, 1) if "decoder_sparse_step" in cfg else 1
    if top_k > experts:
        raise ConfigError(f"{source}: field 'num_experts_per_tok'={top_k} exceeds num_experts={experts}")
    norm = cfg.get("norm_topk_prob", True)
    if not isinstance(norm, bool):
        raise ConfigError(f"{source}: field 'norm_topk_prob' must be true or false, got {norm!r}")
    if norm and top_k == 1:  # every weight would be 1; Megatron's softmax router needs k > 1 for it
        raise ConfigError(f"{source}: field 'num_experts_per_tok'=1 with norm_topk_prob=true is not supported")
    dense = cfg.get("mlp_only_layers") or []
    layers = cfg.get("num_hidden_layers")
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < (layers or 0) for i in dense):
        raise ConfigError(f"{source}: field 'mlp_only_layers' must list layer indices in [0, {layers}), got {dense!r}")
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE's shared expert: not in Qwen3-MoE
        raise ConfigError(f"{source}: field 'shared_expert_intermediate_size' (a shared expert) is not supported")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: field 'use_sliding_window'=true is not supported (Qwen3 attends fully)")
    coef = cfg.get("router_aux_loss_coef", 0.001)
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise ConfigError(f"{source}: field 'router_aux_loss_coef' must be a number >= 0, got {coef!r}")
    return MoEConfig(experts, top_k, width, norm, step, tuple(sorted(set(dense))), float(coef))


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


def validate_parallel(cfg: Qwen3Config, tp: int, pp: int, ep: int = 1, etp: int = 1) -> None:
    """Check that TP divides the head counts, PP the layers, and EP / expert TP the experts,
    before any work."""
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
    validate_experts(cfg, ep, etp)


def validate_experts(cfg: Qwen3Config, ep: int, etp: int) -> None:
    """Expert parallel splits the experts, expert tensor parallel each expert's width."""
    if cfg.moe is None:
        if ep > 1 or etp > 1:
            raise ConfigError(
                f"parallel.expert_parallel={ep} / parallel.expert_tensor_parallel={etp} need a Qwen3-MoE model; "
                "this one is dense"
            )
        return
    if cfg.moe.num_experts % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} does not divide num_experts={cfg.moe.num_experts}")
    width = cfg.moe.moe_intermediate_size
    if width % etp:
        raise ConfigError(f"parallel.expert_tensor_parallel={etp} does not divide moe_intermediate_size={width}")


def validate_training_layout(cfg: Qwen3Config, par: ParallelConfig) -> None:
    """``validate_parallel`` for a training run's ``parallel`` section, plus what Megatron-Core
    needs to train a MoE model under tensor parallelism: sequence parallel."""
    validate_parallel(cfg, par.tp, par.pp, par.expert_parallel, par.expert_tensor_parallel)
    if cfg.moe is not None and par.tp > 1 and not par.sequence_parallel:
        raise ConfigError(
            f"parallel.tp={par.tp} with a Qwen3-MoE model needs parallel.sequence_parallel=true: Megatron-Core "
            "trains MoE layers under tensor parallelism only with sequence parallel (Transformer Engine layers)"
        )
