"""HF-named tensors <-> this rank's Megatron model stage, through ``models.hf_mapping``.

Loading reads only the tensors this stage needs; iterating gathers TP shards into full HF
tensors. Used by conversion, checkpoint export, training start-up and the live weight sync.

Qwen3-MoE: a rank holds the experts of its expert-parallel (EP) rank, each split over expert
tensor parallelism (ETP). Loading takes those experts' slices; iterating yields a layer's
experts in global order, one tensor at a time: its owner's ETP group all-gathers it and the
owner broadcasts it over the EP group, so no rank ever holds more than one expert tensor beyond
its own shard (never a layer's experts at once).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExpertLayout:
    """Where this rank sits among the experts (all 1 / 0 for a dense model)."""

    ep_rank: int = 0
    ep: int = 1
    ep_group: object = None
    etp_rank: int = 0
    etp: int = 1
    etp_group: object = None
    edp_rank: int = 0  # expert data-parallel rank: replicas of the same experts
    local: int = 0  # experts per EP rank

    @property
    def offset(self) -> int:
        """Global index of this rank's first expert."""
        return self.ep_rank * self.local


def expert_layout(cfg: Qwen3Config) -> ExpertLayout:
    """This rank's ``ExpertLayout`` (Megatron's parallel state must be initialised)."""
    if cfg.moe is None:
        return ExpertLayout()
    from megatron.core import parallel_state as ps

    ep = ps.get_expert_model_parallel_world_size()
    return ExpertLayout(
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep=ep,
        ep_group=ps.get_expert_model_parallel_group(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        local=cfg.moe.num_experts // ep,
    )


def uses_te(model: torch.nn.Module) -> bool:
    """True if the model was built with Transformer Engine layers (fused norm names)."""
    return any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def local_params(model: torch.nn.Module, cfg: Qwen3Config) -> Iterator[tuple[str, hf_mapping.ParamSpec, torch.Tensor]]:
    """This stage's parameters with their global names (global expert indices too) and mapping
    specs, in model order."""
    specs = hf_mapping.param_specs(cfg, te=uses_te(model))
    offset, experts = layer_offset(model), expert_layout(cfg).offset
    for name, param in model.named_parameters():
        gname = hf_mapping.global_name(name, offset, experts)
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
    ex = expert_layout(cfg)
    padded = padded_vocab_size(cfg.vocab_size, tp)
    expected = hf_mapping.hf_tensor_shapes(cfg)
    with torch.no_grad():
        for gname, spec, param in local_params(model, cfg):
            tensors = {n: get_tensor(n) for n in spec.hf}
            for n, t in tensors.items():
                if tuple(t.shape) != expected[n]:
                    raise _shape_error(source, n, gname, tuple(t.shape), expected[n])
            full = hf_mapping.to_megatron(spec, tensors, cfg, padded)
            part = hf_mapping.shard(spec, full, *((ex.etp_rank, ex.etp) if spec.expert else (tp_rank, tp)))
            if tuple(part.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{source}: Megatron tensor {gname} (from HF {', '.join(spec.hf)}) gets shape "
                    f"{tuple(part.shape)}, the model has {tuple(param.shape)}"
                )
            param.copy_(part.to(param.dtype))
            if on_param:
                on_param(gname)


def iter_hf_weights(
    model: torch.nn.Module, cfg: Qwen3Config, every_replica: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield this stage's weights as full HF-named tensors, gathering TP shards (and, for
    Qwen3-MoE, each expert from its owner, one tensor at a time; see the module docstring).

    Collective over the stage's tensor-, expert- and expert-tensor-parallel groups: every rank
    of the stage must iterate. ``every_replica=False``: only the ranks of the first data-parallel
    replica get the dense tensors and only those of the first expert-data-parallel replica the
    experts (the others yield nothing and take part in nothing): what one copy needs.
    Tied embeddings are yielded once (from the embedding, never from an output-layer copy).
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp, group = _parallel()
    ex = expert_layout(cfg)
    dense = every_replica or ps.get_data_parallel_rank() == 0
    experts = every_replica or ex.edp_rank == 0
    params = list(local_params(model, cfg))
    specs = hf_mapping.param_specs(cfg, te=uses_te(model))
    i = 0
    while i < len(params):
        gname, spec, param = params[i]
        if spec.expert:  # the run of this layer's expert parameters
            j = i
            while j < len(params) and params[j][1].expert:
                j += 1
            if experts:
                yield from _layer_experts(params[i:j], specs, cfg, ex)
            i = j
            continue
        i += 1
        if not dense or (gname == "output_layer.weight" and cfg.tie_word_embeddings):
            continue
        data = param.detach()
        if tp > 1 and spec.split is not None:
            shards = [torch.empty_like(data) for _ in range(tp)]
            dist.all_gather(shards, data.contiguous(), group=group)
            full = hf_mapping.unshard(spec, shards)
        else:
            full = data
        yield from hf_mapping.to_hf(spec, full, cfg).items()


def _layer_experts(
    run: list[tuple[str, hf_mapping.ParamSpec, torch.Tensor]],
    specs: dict[str, hf_mapping.ParamSpec],
    cfg: Qwen3Config,
    ex: ExpertLayout,
) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's experts in global order from this EP rank's ``run`` of expert parameters.

    Collective over the EP and ETP groups. Expert ``e`` is the local expert ``e % local`` of EP
    rank ``e // local``, whose ETP group all-gathers its shards; that rank then broadcasts it."""
    layer = run[0][0].split(".")[2]
    mine = {}  # (local index, "linear_fc1" / "linear_fc2") -> this rank's shard
    for gname, _, param in run:
        e, fc = gname.split(".")[5], gname.split(".")[6]
        mine[(int(e) - ex.offset, fc)] = param.detach()
    for e in range(cfg.moe.num_experts):
        owner, j = divmod(e, ex.local)
        for fc in ("linear_fc1", "linear_fc2"):
            spec = specs[f"decoder.layers.{layer}.mlp.experts.{e}.{fc}.weight"]
            data = mine[(j, fc)]  # every EP rank holds local expert j: the same shape
            if ex.ep_rank == owner and ex.etp > 1:
                shards = [torch.empty_like(data) for _ in range(ex.etp)]
                dist.all_gather(shards, data.contiguous(), group=ex.etp_group)
                full = hf_mapping.unshard(spec, shards)
            elif ex.ep_rank == owner:
                full = data
            else:
                shape = list(data.shape)
                shape[spec.split] *= ex.etp
                full = torch.empty(shape, dtype=data.dtype, device=data.device)
            if ex.ep > 1:
                full = full.contiguous()
                dist.broadcast(full, src=dist.get_global_rank(ex.ep_group, owner), group=ex.ep_group)
            yield from hf_mapping.to_hf(spec, full, cfg).items()
