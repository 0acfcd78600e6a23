"""The one HF <-> Megatron parameter mapping for Qwen3.

Offline conversion, checkpoint export and live weight sync all go through this module:
a layout bug fixed here is fixed everywhere.

Terms:
* *HF tensors*: as in the HF checkpoint (``model.layers.3.self_attn.q_proj.weight``).
* *full Megatron tensor*: the tensor a TP=1 Megatron model holds, with the vocabulary padded.
* *shard*: the slice that one tensor-parallel rank holds.

Megatron layouts that differ from HF:
* ``linear_qkv``: rows grouped per KV group: for each group ``g``, its ``heads/groups`` query
  heads, then its key head, then its value head (each ``head_dim`` rows). TP splits by groups.
* ``linear_fc1``: ``[gate; up]``; each TP rank holds ``[gate_r; up_r]``.
* embeddings / output layer: vocabulary padded (see ``models.config.padded_vocab_size``).

Qwen3-MoE layers (``cfg.is_sparse(i)``):
* ``pre_mlp_layernorm`` is a separate norm (also with Transformer Engine) and ``mlp.router``
  is the HF ``mlp.gate``, replicated.
* expert ``e`` is named ``decoder.layers.{i}.mlp.experts.{e}.linear_fc{1,2}.weight`` here, with
  its *global* index: a model holds only its expert-parallel rank's experts, under local indices
  (``mlp.experts.local_experts.{j}`` for sequential experts, ``mlp.experts.linear_fc1.weight{j}``
  for TE's grouped GEMM); ``global_name`` maps both. Its ``linear_fc1`` is ``[gate; up]`` of the
  hub's ``mlp.experts.{e}.gate_proj`` / ``up_proj``, split over *expert* tensor parallelism
  (``ParamSpec.expert``) rather than TP.
* transformers 5 keeps a layer's experts in memory as fused 3-D tensors
  (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``) while checkpoints
  on the hub keep one tensor per expert; ``hub_views`` shows such a model's parameters under the
  hub's names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_klear.models.config import Qwen3Config

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# A local expert's parameter: sequential experts, or TE's grouped GEMM (``weight{j}``).
_SEQUENTIAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
# transformers 5's fused experts of one layer
_FUSED_EXPERTS_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ParamSpec:
    """How one Megatron parameter relates to HF tensors and how TP splits it."""

    megatron: str  # name with the global layer index
    hf: tuple[str, ...]  # HF tensors it is made of, in order
    kind: str = "plain"  # "plain", "qkv" or "gate_up"
    split: Optional[int] = None  # TP split dim of the Megatron tensor; None = replicated
    vocab: bool = False  # first dim is the (padded) vocabulary
    expert: bool = False  # a routed expert's weight: split over expert TP, held by one EP rank


def _expert_specs(i: int, cfg: Qwen3Config) -> list[ParamSpec]:
    m, h = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
    specs = [ParamSpec(m + "router.weight", (h + "gate.weight",))]
    for e in range(cfg.moe.num_experts):
        hub = f"{h}experts.{e}."
        specs += [
            ParamSpec(
                f"{m}experts.{e}.linear_fc1.weight",
                (hub + "gate_proj.weight", hub + "up_proj.weight"),
                kind="gate_up",
                split=0,
                expert=True,
            ),
            ParamSpec(f"{m}experts.{e}.linear_fc2.weight", (hub + "down_proj.weight",), split=1, expert=True),
        ]
    return specs


def _layer_specs(i: int, te: bool, cfg: Optional[Qwen3Config] = None) -> list[ParamSpec]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    sparse = cfg is not None and cfg.is_sparse(i)
    in_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te and not sparse else "pre_mlp_layernorm.weight"
    attention = [
        ParamSpec(m + in_norm, (h + "input_layernorm.weight",)),
        ParamSpec(
            m + "self_attention.linear_qkv.weight",
            tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"),
            kind="qkv",
            split=0,
        ),
        ParamSpec(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",)),
        ParamSpec(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",)),
        ParamSpec(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), split=1),
        ParamSpec(m + mlp_norm, (h + "post_attention_layernorm.weight",)),
    ]
    if sparse:
        return attention + _expert_specs(i, cfg)
    return attention + [
        ParamSpec(
            m + "mlp.linear_fc1.weight",
            (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            kind="gate_up",
            split=0,
        ),
        ParamSpec(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), split=1),
    ]


def param_specs(cfg: Qwen3Config, te: bool = False) -> dict[str, ParamSpec]:
    """Every Megatron parameter of the full model (global layer indices), by Megatron name.

    With tied embeddings there is no ``output_layer.weight`` entry: a last pipeline stage
    that holds a copy maps it through ``spec_for``.
    """
    specs = [ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=0, vocab=True)]
    for i in range(cfg.num_hidden_layers):
        specs += _layer_specs(i, te, cfg)
    specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), split=0, vocab=True))
    return {s.megatron: s for s in specs}


def global_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """Megatron state-dict name with the pipeline stage's layer offset applied, and a local
    expert's index made global (``expert_offset``: the first expert of this EP rank)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    rest = m.group(2)
    if e := _SEQUENTIAL_EXPERT_RE.match(rest):
        rest = f"mlp.experts.{int(e.group(1)) + expert_offset}.{e.group(2)}"
    elif e := _GROUPED_EXPERT_RE.match(rest):
        rest = f"mlp.experts.{int(e.group(2)) + expert_offset}.{e.group(1)}.weight"
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


def spec_for(name: str, specs: Mapping[str, ParamSpec], cfg: Qwen3Config) -> ParamSpec:
    """The spec of a global Megatron parameter name; KeyError names it if unmapped."""
    if name in specs:
        return specs[name]
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        # Last pipeline stage's copy of the tied embedding.
        return ParamSpec(name, ("model.embed_tokens.weight",), split=0, vocab=True)
    raise KeyError(f"Megatron parameter {name!r} has no HF mapping for Qwen3")


def is_mapped_state_key(name: str) -> bool:
    """False for Megatron state entries that are not parameters (TE/FP8 ``_extra_state``)."""
    return not name.endswith("_extra_state")


# --- HF -> Megatron ---------------------------------------------------------------------------


def to_megatron(spec: ParamSpec, hf: Mapping[str, torch.Tensor], cfg: Qwen3Config, padded_vocab: int) -> torch.Tensor:
    """The full (TP=1) Megatron tensor from its HF tensors."""
    parts = [hf[n] for n in spec.hf]
    if spec.kind == "qkv":
        q, k, v = parts
        g, hd = cfg.num_key_value_heads, cfg.head_dim
        h = q.shape[-1]
        q = q.reshape(g, -1, hd, h)
        k = k.reshape(g, 1, hd, h)
        v = v.reshape(g, 1, hd, h)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)
    if spec.kind == "gate_up":
        return torch.cat(parts, dim=0)
    t = parts[0]
    if spec.vocab and t.shape[0] != padded_vocab:
        pad = t.new_zeros((padded_vocab - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    return t


def shard(spec: ParamSpec, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The slice of a full Megatron tensor held by TP rank ``tp_rank``."""
    if spec.split is None or tp == 1:
        return full
    if spec.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=spec.split)[tp_rank]


# --- Megatron -> HF ---------------------------------------------------------------------------


def unshard(spec: ParamSpec, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from the TP shards in rank order (inverse of ``shard``)."""
    if spec.split is None or len(shards) == 1:
        return shards[0]
    if spec.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=spec.split)


def to_hf(spec: ParamSpec, full: torch.Tensor, cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """HF tensors from a full Megatron tensor (vocabulary padding removed)."""
    if spec.kind == "qkv":
        g, hd = cfg.num_key_value_heads, cfg.head_dim
        h = full.shape[-1]
        per_group = cfg.num_attention_heads // g
        x = full.reshape(g, per_group + 2, hd, h)
        q = x[:, :per_group].reshape(-1, h)
        k = x[:, per_group].reshape(-1, h)
        v = x[:, per_group + 1].reshape(-1, h)
        return {n: t.contiguous() for n, t in zip(spec.hf, (q, k, v))}
    if spec.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return {spec.hf[0]: gate.contiguous(), spec.hf[1]: up.contiguous()}
    if spec.vocab:
        full = full[: cfg.vocab_size]
    return {spec.hf[0]: full.contiguous()}


def hf_tensor_names(cfg: Qwen3Config) -> list[str]:
    """Every tensor name an HF Qwen3 checkpoint of this config must hold."""
    return [n for s in param_specs(cfg).values() for n in s.hf]


def hf_tensor_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of an HF Qwen3 checkpoint of this config."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    if cfg.moe is not None:
        fe = cfg.moe.moe_intermediate_size
        expert = {"gate_proj.weight": (fe, h), "up_proj.weight": (fe, h), "down_proj.weight": (h, fe)}
    by_suffix = {
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "o_proj.weight": (h, q),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "down_proj.weight": (h, f),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
        "embed_tokens.weight": (cfg.vocab_size, h),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    shapes = {}
    for name in hf_tensor_names(cfg):
        suffix = ".".join(name.split(".")[-2:])
        if ".mlp.experts." in name:
            shapes[name] = expert[suffix]
        elif name.endswith(".mlp.gate.weight"):
            shapes[name] = (cfg.moe.num_experts, h)
        else:
            shapes[name] = by_suffix.get(suffix, (h,))  # the remaining ones are RMSNorm weights
    return shapes


def active_params(cfg: Qwen3Config) -> int:
    """Parameters one token passes through: a MoE layer's top-k experts, not all of them."""
    total = num_params(cfg)
    if cfg.moe is None:
        return total
    moe = cfg.moe
    per_expert = 3 * cfg.hidden_size * moe.moe_intermediate_size
    sparse = sum(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers))
    return total - sparse * (moe.num_experts - moe.num_experts_per_tok) * per_expert


def hub_views(named_params) -> dict[str, torch.Tensor]:
    """A transformers model's parameters under the hub checkpoint's names, as views that share
    their storage: a fused expert tensor of transformers 5 shows as one view per expert and
    projection (``gate_up_proj[e]`` is ``[gate; up]``, as its forward splits it), every other
    parameter as itself. Copying into a view updates the model."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        m = _FUSED_EXPERTS_RE.match(name)
        if m is None:
            out[name] = p
            continue
        prefix, p = m.group(1), p.detach()  # detached views still share the parameter's storage
        for e in range(p.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = p[e]
            else:
                gate, up = p[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
    return out


def num_params(cfg: Qwen3Config) -> int:
    """Parameter count of the HF model (unpadded vocabulary)."""
    return sum(math.prod(shape) for shape in hf_tensor_shapes(cfg).values())
