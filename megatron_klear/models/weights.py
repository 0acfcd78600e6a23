"""HF-named tensors <-> this rank's Megatron model stage, through ``models.hf_mapping``.

Loading reads only the tensors this stage needs; iterating gathers TP shards into full HF
tensors. Used by conversion, checkpoint export, training start-up and the live weight sync.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_klear.errors import CheckpointError
from megatron_klear.models import hf_mapping
from megatron_klear.models.config import Qwen3Config, padded_vocab_size


def _parallel() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


def uses_te(model: torch.nn.Module) -> bool:
    """True if the model was built with Transformer Engine layers (fused norm names)."""
    return any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def local_params(model: torch.nn.Module, cfg: Qwen3Config) -> Iterator[tuple[str, hf_mapping.ParamSpec, torch.Tensor]]:
    """This stage's parameters with their global names and mapping specs, in model order."""
    specs = hf_mapping.param_specs(cfg, te=uses_te(model))
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        gname = hf_mapping.global_name(name, offset)
        yield gname, hf_mapping.spec_for(gname, specs, cfg), param


def _shape_error(source: str, hf_name: str, megatron_name: str, found: tuple, expected: tuple) -> CheckpointError:
    return CheckpointError(
        f"{source}: HF tensor {hf_name} (Megatron {megatron_name}) has shape {found}, expected {expected} "
        "from the model's config.json"
    )


def check_hf_shapes(cfg: Qwen3Config, shape_of: Callable[[str], tuple], source: str) -> None:
    """Every HF tensor has the shape ``cfg`` implies; ``shape_of(name)`` reads it (from the file
    header: nothing is loaded). The error names the HF and Megatron tensors and both shapes."""
    expected = hf_mapping.hf_tensor_shapes(cfg)
    for mname, spec in hf_mapping.param_specs(cfg).items():
        for name in spec.hf:
            found = tuple(shape_of(name))
            if found != expected[name]:
                raise _shape_error(source, name, mname, found, expected[name])


def load_hf_weights(
    model: torch.nn.Module,
    cfg: Qwen3Config,
    get_tensor: Callable[[str], torch.Tensor],
    on_param: Callable[[str], None] | None = None,
    source: str = "HF checkpoint",
) -> None:
    """Fill this rank's model stage from HF tensors fetched one at a time by ``get_tensor``.

    Only the tensors this stage needs are read; each full tensor is dropped after its
    shard is copied, so memory stays at the stage size plus one layer's tensor. A tensor of
    the wrong shape is a ``CheckpointError`` naming ``source``, the HF and the Megatron tensor
    and the expected and found shapes.
    """
    tp_rank, tp, _ = _parallel()
    padded = padded_vocab_size(cfg.vocab_size, tp)
    expected = hf_mapping.hf_tensor_shapes(cfg)
    with torch.no_grad():
        for gname, spec, param in local_params(model, cfg):
            tensors = {n: get_tensor(n) for n in spec.hf}
            for n, t in tensors.items():
                if tuple(t.shape) != expected[n]:
                    raise _shape_error(source, n, gname, tuple(t.shape), expected[n])
            full = hf_mapping.to_megatron(spec, tensors, cfg, padded)
            part = hf_mapping.shard(spec, full, tp_rank, tp)
            if tuple(part.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{source}: Megatron tensor {gname} (from HF {', '.join(spec.hf)}) gets shape "
                    f"{tuple(part.shape)}, the model has {tuple(param.shape)}"
                )
            param.copy_(part.to(param.dtype))
            if on_param:
                on_param(gname)


def iter_hf_weights(model: torch.nn.Module, cfg: Qwen3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield this stage's weights as full HF-named tensors, gathering TP shards.

    Collective over the tensor-parallel group: every TP rank of the stage must iterate.
    Tied embeddings are yielded once (from the embedding, never from an output-layer copy).
    """
    tp_rank, tp, group = _parallel()
    for gname, spec, param in local_params(model, cfg):
        if gname == "output_layer.weight" and cfg.tie_word_embeddings:
            continue
        data = param.detach()
        if tp > 1 and spec.split is not None:
            shards = [torch.empty_like(data) for _ in range(tp)]
            dist.all_gather(shards, data.contiguous(), group=group)
            full = hf_mapping.unshard(spec, shards)
        else:
            full = data
        yield from hf_mapping.to_hf(spec, full, cfg).items()
