"""What a Qwen3 network is: the fields of an HF ``config.json``, read and checked.

No Megatron here: this is the model's identity, shared by the mapping, conversion, training
and the inference engines. Errors name the file and the field.

Qwen3-MoE (``Qwen3MoeForCausalLM``, e.g. Qwen3-30B-A3B) is the same network with a routed
mixture of experts in place of the MLP of its sparse layers (``MoEConfig``); settings of that
family we cannot reproduce exactly are refused, naming the key.

Positions: plain RoPE, or YaRN (``rope_type: yarn``) read exactly as transformers reads it
(``YarnScaling``), so that the trainer, the HF engine and SGLang rotate by the same angles.
Whatever the model cannot honour is refused here, naming the key: other RoPE types, sliding-
window attention, and the YaRN keys that transformers and SGLang read differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURE, MOE_MODEL_TYPE = "Qwen3MoeForCausalLM", "qwen3_moe"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_ROPE_THETA = 1_000_000.0
# Keys of a YaRN ``rope_parameters`` / ``rope_scaling`` dict that transformers (5.x) and SGLang
# (0.5.23) both read the same way once normalised (``YarnScaling.hf_dict``). Others are refused:
# ``attention_factor`` (SGLang ignores it), ``attn_factor`` / ``extrapolation_factor`` (transformers
# ignores them), ``partial_rotary_factor`` (Qwen3 rotates the whole head).
YARN_KEYS = frozenset(
    {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
     "truncate", "mscale", "mscale_all_dim"}
)  # fmt: skip


@dataclass(frozen=True)
class YarnScaling:
    """YaRN position scaling, with transformers' defaults resolved (``read_rope``).

    Transformers (``_compute_yarn_parameters``): inverse frequencies interpolated by ``factor``
    outside the band ``[beta_slow, beta_fast]`` rotations within ``original_max_position_embeddings``
    (band edges floored / ceiled when ``truncate``), and cos / sin scaled by ``attention_factor``.
    ``mscale`` / ``mscale_all_dim`` are kept only when both are set and non-zero, the only case in
    which transformers uses them.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None

    @property
    def attention_factor(self) -> float:
        """The factor transformers multiplies cos and sin by (YaRN paper Eq. 21)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def context_length(self) -> int:
        """The context this scaling is meant to reach: ``original_max_position_embeddings * factor``."""
        return int(self.original_max_position_embeddings * self.factor)

    def hf_dict(self, rope_theta: Optional[float] = None) -> dict:
        """The scaling as a complete ``rope_parameters`` dict (every default spelled out), which
        transformers and SGLang read to the same angles."""
        d = {
            "rope_type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "truncate": self.truncate,
        }
        if self.mscale and self.mscale_all_dim:
            d.update(mscale=self.mscale, mscale_all_dim=self.mscale_all_dim)
        if rope_theta is not None:
            d["rope_theta"] = rope_theta
        return d


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(factor) + 1`` (1 when ``factor <= 1``), as transformers computes it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
    rope_scaling: Optional[YarnScaling] = None  # None: plain RoPE
    moe: Optional[MoEConfig] = None  # Qwen3-MoE; None: dense Qwen3

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) is a mixture-of-experts layer."""
        return self.moe is not None and self.moe.is_sparse(layer)

    @property
    def context_length(self) -> int:
        """The longest sequence the model is meant for: ``max_position_embeddings``, or what its
        YaRN scaling reaches when that is longer."""
        reach = self.rope_scaling.context_length if self.rope_scaling else 0
        return max(self.max_position_embeddings, reach)

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
        check_full_attention(cfg, source)
        rope_theta, scaling = read_rope(cfg, source)
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
            rope_theta=rope_theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype,
            raw=dict(cfg),
            rope_scaling=scaling,
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
    coef = cfg.get("router_aux_loss_coef", 0.001)
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise ConfigError(f"{source}: field 'router_aux_loss_coef' must be a number >= 0, got {coef!r}")
    return MoEConfig(experts, top_k, width, norm, step, tuple(sorted(set(dense))), float(coef))


def _number(value, key: str, source: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{source}: {key} must be a number >= {minimum}, got {value!r}")
    return float(value)


def rope_dict(cfg: dict) -> tuple[str, dict]:
    """(key, dict) of the config's RoPE parameters as transformers picks them: a non-empty legacy
    ``rope_scaling`` wins over ``rope_parameters``."""
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            return key, cfg[key]
    return "rope_parameters", {}


def read_rope(cfg: dict, source: str = "config.json") -> tuple[float, Optional[YarnScaling]]:
    """``(rope_theta, YaRN scaling or None)`` of an HF config dict, resolved as transformers 5
    resolves them (``standardize_rope_params`` and ``_compute_yarn_parameters``). Raises
    ConfigError naming the key for a RoPE type or YaRN key we cannot honour."""
    key, rope = rope_dict(cfg)
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: {key} must be a dict, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"{source}: {key} is given per layer type; Qwen3 has one RoPE for every layer")
    theta = _number(rope.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)), "rope_theta", source, 1.0)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial!r}; Qwen3 rotates the whole head (1.0)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(
            f"{source}: {key}.rope_type={rope_type!r} is not supported: the Megatron model applies plain RoPE "
            f"('default') and 'yarn' exactly as transformers does, and nothing else"
        )
    unknown = sorted(set(rope) - YARN_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: {key}.{unknown[0]} is not supported with YaRN (transformers and SGLang read it "
            f"differently); supported keys: {', '.join(sorted(YARN_KEYS))}"
        )
    max_pos = cfg.get("max_position_embeddings", 40960)
    # transformers: a top-level original_max_position_embeddings wins, then the dict's, then max_position_embeddings
    orig = cfg.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", max_pos))
    if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
        raise ConfigError(f"{source}: {key}.original_max_position_embeddings must be a positive integer, got {orig!r}")
    if rope.get("factor") is None:
        raise ConfigError(f"{source}: {key}.factor is required with rope_type 'yarn' (transformers requires it too)")
    factor = _number(rope["factor"], f"{key}.factor", source, 1.0)
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{source}: {key}.truncate must be true or false, got {truncate!r}")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if bool(mscale) != bool(mscale_all_dim):  # transformers uses neither, SGLang uses a set one
        raise ConfigError(
            f"{source}: {key}.mscale and {key}.mscale_all_dim must both be set (non-zero) or both be absent"
        )
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=_number(rope.get("beta_fast") or 32, f"{key}.beta_fast", source, 0.0),
        beta_slow=_number(rope.get("beta_slow") or 1, f"{key}.beta_slow", source, 0.0),
        truncate=truncate,
        mscale=_number(mscale, f"{key}.mscale", source, 0.0) if mscale else None,
        mscale_all_dim=_number(mscale_all_dim, f"{key}.mscale_all_dim", source, 0.0) if mscale_all_dim else None,
    )


def check_full_attention(cfg: dict, source: str = "config.json") -> None:
    """Refuse sliding-window attention (every layer of our model attends to the whole causal
    context), naming the key that asks for it. The layers transformers would window:
    ``layer_types`` when given, else the layers from ``max_window_layers`` on when
    ``use_sliding_window`` is true and ``sliding_window`` is set."""
    layers = cfg.get("num_hidden_layers") or 0
    types = cfg.get("layer_types")
    if types is not None:
        windowed = [i for i, t in enumerate(types) if t != "full_attention"]
        if windowed:
            raise ConfigError(
                f"{source}: layer_types[{windowed[0]}]={types[windowed[0]]!r}: sliding-window attention is not "
                f"supported (every layer must be 'full_attention')"
            )
        return
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
        if cfg.get("max_window_layers", 28) < layers:
            raise ConfigError(
                f"{source}: use_sliding_window=true (sliding_window={cfg['sliding_window']}, from layer "
                f"{cfg.get('max_window_layers', 28)} on) is not supported: set use_sliding_window to false"
            )


def with_rope_scaling(cfg: dict, scaling: Optional[YarnScaling], context_length: Optional[int] = None) -> dict:
    """A copy of HF config dict ``cfg`` that applies ``scaling`` (None: plain RoPE) in the format
    transformers 5 writes (``rope_parameters``, no legacy ``rope_scaling``), with
    ``max_position_embeddings`` raised to ``context_length`` when that is longer."""
    theta, _ = read_rope(cfg)
    out = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "original_max_position_embeddings")}
    out["rope_parameters"] = scaling.hf_dict(theta) if scaling else {"rope_type": "default", "rope_theta": theta}
    if context_length is not None and context_length > out.get("max_position_embeddings", 0):
        out["max_position_embeddings"] = context_length
    return out


def served_config(
    raw: dict,
    rope_override: Optional[dict] = None,
    context_length: Optional[int] = None,
    source: str = "config.json",
    where: str = "engine",
) -> tuple[dict, int]:
    """``(HF config dict, context length)`` an inference engine serves the model ``raw`` with.

    ``rope_override`` updates the model's RoPE dict key by key (as SGLang's
    ``--json-model-override-args`` merges it), e.g. ``{rope_type: yarn, factor: 2.5,
    original_max_position_embeddings: 32768}``; the result is written complete
    (``with_rope_scaling``), so transformers and SGLang read the same angles from it.
    ``context_length`` defaults to what the model reaches (``Qwen3Config.context_length``);
    a longer one is refused naming ``<where>.context_length``. ``max_position_embeddings`` is
    raised to the context (SGLang refuses a context beyond it).
    """
    if rope_override is not None:
        if not isinstance(rope_override, dict) or rope_override.get("rope_type", rope_override.get("type")) != "yarn":
            raise ConfigError(f"{where}.rope_scaling must be a dict with rope_type 'yarn', got {rope_override!r}")
        key, current = rope_dict(raw)
        raw = {**raw, key: {**(current if isinstance(current, dict) else {}), **rope_override}}
        source = f"{where}.rope_scaling over {source}"
    cfg = Qwen3Config.from_dict(raw, source)
    reach = cfg.context_length
    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise ConfigError(f"{where}.context_length must be a positive integer, got {context_length!r}")
        if context_length > reach:
            raise ConfigError(
                f"{where}.context_length={context_length} exceeds the {reach} positions the model reaches "
                f"(max_position_embeddings, or original_max_position_embeddings x factor with YaRN): "
                f"lower it or scale the positions with YaRN ({where}.rope_scaling)"
            )
    context = context_length or reach
    if cfg.rope_scaling is None and context <= cfg.max_position_embeddings:
        return raw, context
    return with_rope_scaling(raw, cfg.rope_scaling, context), context


def read_config_dict(model_dir: str | Path) -> dict:
    """The ``config.json`` of an HF model directory as a dict (errors name the file)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json (is {model_dir} an HF model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def load_hf_config(model_dir: str | Path) -> Qwen3Config:
    """Read ``config.json`` from an HF model directory."""
    return Qwen3Config.from_dict(read_config_dict(model_dir), source=str(Path(model_dir) / "config.json"))


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
