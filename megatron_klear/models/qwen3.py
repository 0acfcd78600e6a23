"""Qwen3 dense models as Megatron-Core ``GPTModel`` built from an HF ``config.json``.

Layer spec: Transformer Engine when importable (fused norms, FP8), otherwise Megatron-Core's
torch-native local spec, which is what runs on CPU and on GPUs without TE.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_klear.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return _DTYPES[self.dtype]

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
        if dtype not in _DTYPES:
            raise ConfigError(f"{source}: field 'dtype' must be one of {sorted(_DTYPES)}, got {dtype!r}")
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

    @property
    def num_params(self) -> int:
        """Parameter count of the HF model (unpadded vocabulary)."""
        from megatron_klear.checkpoint.mapping import hf_tensor_shapes

        return sum(math.prod(shape) for shape in hf_tensor_shapes(self).values())


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


@dataclass
class ModelOptions:
    """How to build the Megatron model (as opposed to what the network is)."""

    params_dtype: Optional[str] = None  # default: the HF config's dtype
    use_te: Optional[bool] = None  # default: when Transformer Engine is importable
    fp8: Optional[str] = None  # "hybrid" or "e4m3"; Transformer Engine only
    sequence_parallel: bool = False
    recompute: Optional[str] = None  # None, "full" or "selective"
    init_weights: bool = True  # False when every weight is loaded right after


def have_transformer_engine() -> bool:
    """True if Transformer Engine imports (never on our CPU machines)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(cfg: Qwen3Config, tp: int, pp: int, opts: ModelOptions, cp: int = 1):
    """Megatron ``TransformerConfig`` for a Qwen3 model at the given parallel sizes."""
    from megatron.core.transformer import TransformerConfig

    validate_parallel(cfg, tp, pp)
    use_te = have_transformer_engine() if opts.use_te is None else opts.use_te
    if opts.fp8 and not use_te:
        raise ConfigError("model.fp8 needs Transformer Engine, which is not installed")
    if opts.sequence_parallel and not use_te:
        raise ConfigError("parallel.sequence_parallel needs Transformer Engine layers")
    if cp > 1 and not use_te:  # Megatron's torch-native attention has no context-parallel path
        raise ConfigError(f"parallel.context_parallel={cp} needs Transformer Engine attention, which is not in use")
    dtype = _DTYPES[opts.params_dtype or cfg.dtype]
    recompute = {}
    if opts.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif opts.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif opts.recompute is not None:
        raise ConfigError(f"model.recompute must be null, 'full' or 'selective', got {opts.recompute!r}")
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=use_te,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=opts.init_weights,
        fp8=opts.fp8,
        **recompute,
    )


def layer_spec(use_te: bool):
    """Transformer Engine layer spec, or the torch-native local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def build_model(cfg: Qwen3Config, opts: Optional[ModelOptions] = None):
    """The ``GPTModel`` stage of this rank (Megatron's parallel state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    opts = opts or ModelOptions()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    tcfg = transformer_config(cfg, tp, pp, opts, cp)
    use_te = have_transformer_engine() if opts.use_te is None else opts.use_te
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=padded_vocab_size(cfg.vocab_size, tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
