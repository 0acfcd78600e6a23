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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megatron_klear.models.config import Qwen3Config

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamSpec:
    """How one Megatron parameter relates to HF tensors and how TP splits it."""

    megatron: str  # name with the global layer index
    hf: tuple[str, ...]  # HF tensors it is made of, in order
    kind: str = "plain"  # "plain", "qkv" or "gate_up"
    split: Optional[int] = None  # TP split dim of the Megatron tensor; None = replicated
    vocab: bool = False  # first dim is the (padded) vocabulary


def _layer_specs(i: int, te: bool) -> list[ParamSpec]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    in_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    return [
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
        specs += _layer_specs(i, te)
    specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), split=0, vocab=True))
    return {s.megatron: s for s in specs}


def global_name(local_name: str, layer_offset: int) -> str:
    """Megatron state-dict name with the pipeline stage's layer offset applied."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"


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
        shapes[name] = by_suffix.get(suffix, (h,))  # the remaining ones are RMSNorm weights
    return shapes


def num_params(cfg: Qwen3Config) -> int:
    """Parameter count of the HF model (unpadded vocabulary)."""
    return sum(math.prod(shape) for shape in hf_tensor_shapes(cfg).values())
