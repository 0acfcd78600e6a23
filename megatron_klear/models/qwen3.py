"""Qwen3 models (dense and MoE) as Megatron-Core ``GPTModel`` built from an HF ``config.json``.

Layer spec: Transformer Engine when importable (fused norms, FP8), otherwise Megatron-Core's
torch-native local spec, which is what runs on CPU and on GPUs without TE.

Qwen3-MoE uses Megatron-Core's MoE layer: a softmax top-k router (``norm_topk_prob`` is a
softmax over the top-k logits, as in transformers; without it, the top-k of a softmax over all
experts), the load-balancing auxiliary loss (``model.moe_aux_loss_coef``; Megatron adds its
gradient itself and logs it in its tracker), the all-to-all token dispatcher (on GPUs and, with
``compat``, on gloo), and TE's grouped GEMM experts when TE is in use, sequential experts
otherwise. Dense layers among sparse ones (``mlp_only_layers``, ``decoder_sparse_step``) follow
the HF rule through Megatron's ``moe_layer_freq`` pattern.

Positions: plain RoPE, or YaRN when the config asks for it (``Qwen3Config.rope_scaling``), with
Megatron-Core 0.16's own ``YarnRotaryEmbedding`` (``position_embedding_type="yarn"``). Its
angles and its cos / sin scale are those of transformers' Qwen3 bit for bit once our resolved
values are passed (tests/unit/test_yarn.py compares the tables, then logits at TP=2, packed and
past the original context), so we use it rather than our own. The attention applies the scale
(``mscale``) only in Megatron's unfused RoPE: TE's fused THD kernel would drop it, so RoPE
fusion is off under YaRN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_klear.errors import ConfigError
from megatron_klear.models.config import DTYPES, Qwen3Config, YarnScaling, padded_vocab_size, validate_parallel

FP8_FORMATS = ("hybrid", "e4m3")
# Megatron-Core's FP8 scaling recipes. "tensorwise" (per-tensor current scaling) is NVIDIA's
# recommendation on Hopper with Transformer Engine >= 2.2, hence the default; "delayed" takes the
# scale from an amax history (fp8_amax_history_len, 1024 by default here: Megatron's own default of
# 1 makes delayed scaling follow a single step's outliers); "blockwise" needs TE >= 2.3; "mxfp8"
# is for Blackwell GPUs.
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")
RECOMPUTE = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# Megatron-Core 0.16's recompute_modules that exist in a dense model (the others are MoE / MLA).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class ModelOptions:
    """How to build the Megatron model (as opposed to what the network is). The run configs'
    ``model`` section extends this class, so its fields are ``model.<field>`` keys."""

    params_dtype: Optional[str] = None  # default: the HF config's dtype
    use_te: Optional[bool] = None  # default: when Transformer Engine is importable
    fp8: Optional[str] = None  # FP8 format, "hybrid" or "e4m3" (SFT, Transformer Engine only); null: bf16
    fp8_recipe: str = "tensorwise"  # FP8 scaling: "tensorwise" (current scaling), "delayed", "blockwise", "mxfp8"
    fp8_amax_history_len: int = 1024  # fp8_recipe=delayed: steps of amax history the scale is taken from
    fp8_amax_compute_algo: str = "max"  # fp8_recipe=delayed: "max" over the history, or "most_recent"
    # Activation recompute: None, "full" (whole layers) or "selective" (recompute_modules).
    recompute: Optional[str] = None
    # "full": "uniform" recomputes every layer in units of recompute_num_layers (default 1);
    # "block" recomputes the first recompute_num_layers layers of each pipeline stage.
    recompute_method: str = "uniform"
    recompute_num_layers: Optional[int] = None  # layers per recompute unit ("full" only; default 1)
    # "selective": which parts of each layer (Megatron's default: ["core_attn"], which a fused
    # TE attention does not need; ["mlp"] frees the most at long sequence lengths).
    recompute_modules: Optional[list[str]] = None
    # Qwen3-MoE: the router's load-balancing loss coefficient (null: the model's
    # router_aux_loss_coef; 0: off). Logged as moe/load_balancing_loss.
    moe_aux_loss_coef: Optional[float] = None
    moe_token_dispatcher: str = "alltoall"  # Qwen3-MoE: "alltoall" (GPUs and CPU) or "allgather"
    moe_grouped_gemm: Optional[bool] = None  # Qwen3-MoE: TE's grouped GEMM experts (default: with TE)

    def validate(self, where: str = "model") -> None:
        if self.params_dtype is not None and self.params_dtype not in DTYPES:
            raise ConfigError(f"{where}.params_dtype must be one of {sorted(DTYPES)}, got {self.params_dtype!r}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"{where}.fp8 must be null or one of {FP8_FORMATS}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"{where}.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ConfigError(
                f"{where}.fp8_amax_compute_algo must be one of {FP8_AMAX_ALGOS}, got {self.fp8_amax_compute_algo!r}"
            )
        if self.fp8_amax_history_len < 1:
            raise ConfigError(f"{where}.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise ConfigError(f"{where}.recompute must be null, 'full' or 'selective', got {self.recompute!r}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"{where}.recompute_method must be 'uniform' or 'block', got {self.recompute_method!r}")
        if self.recompute != "full" and (self.recompute_num_layers is not None or self.recompute_method != "uniform"):
            raise ConfigError(f"{where}.recompute_method and {where}.recompute_num_layers need {where}.recompute=full")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ConfigError(f"{where}.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")
        if self.recompute_method == "block" and self.recompute_num_layers is None:
            raise ConfigError(f"{where}.recompute_method=block needs {where}.recompute_num_layers (layers per stage)")
        if self.recompute_modules is not None:
            if self.recompute != "selective":
                raise ConfigError(f"{where}.recompute_modules needs {where}.recompute=selective")
            bad = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
            if bad or not self.recompute_modules:
                raise ConfigError(
                    f"{where}.recompute_modules must be a non-empty list of {RECOMPUTE_MODULES}, got "
                    f"{self.recompute_modules!r}"
                )
            if self.fp8 and self.fp8_recipe == "delayed" and "layernorm" in self.recompute_modules:  # Megatron's rule
                raise ConfigError(
                    f"{where}.recompute_modules 'layernorm' does not work with {where}.fp8_recipe=delayed"
                )
        if self.moe_aux_loss_coef is not None and not self.moe_aux_loss_coef >= 0:
            raise ConfigError(f"{where}.moe_aux_loss_coef must be >= 0 (or null), got {self.moe_aux_loss_coef}")
        if self.moe_token_dispatcher not in MOE_DISPATCHERS:
            raise ConfigError(
                f"{where}.moe_token_dispatcher must be one of {MOE_DISPATCHERS}, got {self.moe_token_dispatcher!r}"
            )


def have_transformer_engine() -> bool:
    """True if Transformer Engine imports (never on our CPU machines)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def uses_transformer_engine(opts: ModelOptions) -> bool:
    """Whether a model built with ``opts`` has Transformer Engine layers (``use_te`` resolved)."""
    return have_transformer_engine() if opts.use_te is None else opts.use_te


def transformer_config(
    cfg: Qwen3Config,
    tp: int,
    pp: int,
    opts: ModelOptions,
    cp: int = 1,
    *,
    sequence_parallel: bool = False,
    init_weights: bool = True,
    ddp: bool = False,
    ep: int = 1,
    etp: int = 1,
):
    """Megatron ``TransformerConfig`` for a Qwen3 model at the given parallel sizes.

    ``init_weights=False`` skips the random initialisation when every weight is loaded next.
    ``ddp=True``: the model trains inside Megatron DDP, whose ``main_grad`` buffers fused
    gradient accumulation writes into (a bare model's backward has none).
    """
    from megatron.core.transformer import TransformerConfig

    validate_parallel(cfg, tp, pp, ep, etp)
    ModelOptions.validate(opts)  # the option fields (a run's ModelConfig checked them at load too)
    use_te = uses_transformer_engine(opts)
    if opts.fp8 and not use_te:
        raise ConfigError("model.fp8 needs Transformer Engine, which is not installed")
    if opts.fp8:
        check_fp8_recipe(opts)
    if sequence_parallel and not use_te:
        raise ConfigError("parallel.sequence_parallel needs Transformer Engine layers")
    if cp > 1 and not use_te:  # Megatron's torch-native attention has no context-parallel path
        raise ConfigError(f"parallel.context_parallel={cp} needs Transformer Engine attention, which is not in use")
    dtype = DTYPES[opts.params_dtype or cfg.dtype]
    recompute = recompute_options(opts, cfg.num_hidden_layers // pp)
    on_gpu = torch.cuda.is_available()
    tcfg = TransformerConfig(
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
        apply_rope_fusion=use_te and cfg.rope_scaling is None,  # TE's fused RoPE (sbhd, thd) has no YaRN scale
        gradient_accumulation_fusion=ddp and on_gpu and have_grad_accum_fusion(),
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=init_weights,
        fp8=opts.fp8,
        fp8_recipe=opts.fp8_recipe,
        fp8_amax_history_len=opts.fp8_amax_history_len,
        fp8_amax_compute_algo=opts.fp8_amax_compute_algo,
        **recompute,
        **moe_options(cfg, opts, ep, etp),
    )
    if cfg.rope_scaling is not None:
        set_yarn_fields(tcfg, cfg.rope_scaling)
    return tcfg


def moe_options(cfg: Qwen3Config, opts: ModelOptions, ep: int, etp: int) -> dict:
    """Megatron ``TransformerConfig`` MoE fields for a Qwen3-MoE model (none for a dense one)."""
    if cfg.moe is None:
        return {}
    moe = cfg.moe
    grouped = uses_transformer_engine(opts) if opts.moe_grouped_gemm is None else opts.moe_grouped_gemm
    if grouped and not uses_transformer_engine(opts):  # Megatron's other grouped GEMM is deprecated
        raise ConfigError("model.moe_grouped_gemm=true needs Transformer Engine (TE's grouped GEMM experts)")
    coef = moe.router_aux_loss_coef if opts.moe_aux_loss_coef is None else opts.moe_aux_loss_coef
    return dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.moe_intermediate_size,
        moe_router_topk=moe.num_experts_per_tok,
        moe_router_score_function="softmax",
        # norm_topk_prob: softmax over the top-k logits (= renormalised top-k probabilities);
        # otherwise the top-k of the softmax over all experts, as transformers computes them.
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=coef,
        moe_token_dispatcher_type=opts.moe_token_dispatcher,
        moe_grouped_gemm=grouped,
        moe_layer_freq=[int(cfg.is_sparse(i)) for i in range(cfg.num_hidden_layers)],
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def set_yarn_fields(tcfg, scaling: YarnScaling) -> None:
    """Give a ``TransformerConfig`` the ``yarn_*`` fields Megatron's YaRN embedding and attention
    read (they are declared only on ``MLATransformerConfig``).

    Megatron scales cos / sin by ``mscale(f, yarn_mscale) / mscale(f, yarn_mscale_all_dim)``;
    transformers by ``mscale(f, mscale) / mscale(f, mscale_all_dim)`` when both are non-zero, else
    by ``mscale(f)``, which (1.0, 0.0) gives Megatron exactly.
    """
    both = bool(scaling.mscale and scaling.mscale_all_dim)
    tcfg.yarn_rotary_scaling_factor = scaling.factor
    tcfg.yarn_original_max_position_embeddings = scaling.original_max_position_embeddings
    tcfg.yarn_beta_fast = scaling.beta_fast
    tcfg.yarn_beta_slow = scaling.beta_slow
    tcfg.yarn_mscale = scaling.mscale if both else 1.0
    tcfg.yarn_mscale_all_dim = scaling.mscale_all_dim if both else 0.0
    tcfg.yarn_correction_range_round_to_int = scaling.truncate


# The Transformer Engine each recipe needs (Megatron-Core 0.16's fp8_utils.get_fp8_recipe).
_FP8_MIN_TE = {"tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0.dev0"}


def check_fp8_recipe(opts: ModelOptions) -> None:
    """The installed Transformer Engine can run ``model.fp8_recipe`` (Megatron would assert)."""
    from megatron.core.utils import get_te_version, is_te_min_version

    need = _FP8_MIN_TE.get(opts.fp8_recipe)
    if need and not is_te_min_version(need):
        raise ConfigError(
            f"model.fp8_recipe={opts.fp8_recipe} needs Transformer Engine >= {need.split('.dev')[0]}, this one is "
            f"{get_te_version()}: upgrade it or set model.fp8_recipe=delayed"
        )


def fp8_sequence_multiple(tp: int, sequence_parallel: bool, cp: int = 1) -> int:
    """What a packed sequence's length must be a multiple of for FP8 GEMMs: they take token counts
    that are multiples of 16 (TE's FP8 GEMM alignment), and under sequence parallel each TP rank's
    share must be a multiple of 8; context parallel splits the sequence over ``cp`` ranks first."""
    base = math.lcm(16, 8 * tp) if sequence_parallel else 16
    return cp * base


def recompute_options(opts: ModelOptions, layers_per_stage: int) -> dict:
    """Megatron ``TransformerConfig`` recompute fields for ``opts``."""
    if opts.recompute == "full":
        n = opts.recompute_num_layers or 1
        if opts.recompute_method == "block" and n > layers_per_stage:
            raise ConfigError(
                f"model.recompute_num_layers={n} exceeds the {layers_per_stage} layers of a pipeline stage"
            )
        return dict(recompute_granularity="full", recompute_method=opts.recompute_method, recompute_num_layers=n)
    if opts.recompute == "selective":
        modules = {} if opts.recompute_modules is None else dict(recompute_modules=list(opts.recompute_modules))
        return dict(recompute_granularity="selective", **modules)
    return {}


def have_grad_accum_fusion() -> bool:
    """True when Megatron can fuse weight-gradient accumulation into its GEMMs. That needs apex's
    ``fused_weight_gradient_mlp_cuda`` extension: Transformer Engine fuses it in its own linears,
    but the model's output layer is always Megatron's ColumnParallelLinear, which refuses
    ``gradient_accumulation_fusion`` without that extension."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(use_te: bool, tcfg=None):
    """Transformer Engine layer spec, or the torch-native local spec. A MoE model (``tcfg``, its
    ``TransformerConfig``, has experts) gets this pipeline stage's block spec: MoE layers where
    its ``moe_layer_freq`` says so, dense ones elsewhere."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if tcfg is not None and tcfg.num_moe_experts:
        return specs.get_gpt_decoder_block_spec(tcfg, use_transformer_engine=use_te, normalization="RMSNorm")
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def build_model(
    cfg: Qwen3Config,
    opts: Optional[ModelOptions] = None,
    *,
    sequence_parallel: bool = False,
    init_weights: bool = True,
    ddp: bool = False,
):
    """The ``GPTModel`` stage of this rank (Megatron's parallel state must be initialised).

    ``init_weights=False`` when every weight is loaded right after (saves the random init);
    ``ddp=True`` when it will train inside Megatron DDP (see ``transformer_config``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    opts = opts or ModelOptions()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    tcfg = transformer_config(
        cfg, tp, pp, opts, cp, sequence_parallel=sequence_parallel, init_weights=init_weights, ddp=ddp, ep=ep, etp=etp
    )
    use_te = uses_transformer_engine(opts)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(use_te, tcfg),
        vocab_size=padded_vocab_size(cfg.vocab_size, tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope" if cfg.rope_scaling is None else "yarn",
        rotary_base=int(cfg.rope_theta),
    )
    if not init_weights:
        mark_tensor_parallel_weights(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give every weight of Megatron's tensor-parallel layers the attributes that say how it is
    split (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``).

    Megatron-Core 0.16 sets them only inside the random initialisation of
    ``ColumnParallelLinear``, ``RowParallelLinear`` and ``VocabParallelEmbedding``
    (``perform_initialization``). Built without it (``init_weights=False``: the weights are
    loaded next), a split weight looks replicated across the TP ranks: the gradient norm, and
    so the clipping, then counts only TP rank 0's part of it, and a run resumed from a
    checkpoint (built with the random initialisation, then loaded) clips differently from the
    run it resumes. Layers that set the attributes themselves are left alone."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )
    from megatron.core.transformer.mlp import MLP

    # A gated MLP's fc1 holds [gate, up] interleaved per TP rank: Megatron builds it with stride 2.
    gated = {id(m.linear_fc1) for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit}
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 2 if id(module) in gated else 1)
