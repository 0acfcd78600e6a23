"""Move weights between HF tensors and this rank's Megatron model stage, via ``mapping``."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_klear.checkpoint import mapping
from megatron_klear.models.qwen3 import Qwen3Config, padded_vocab_size


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


def local_params(model: torch.nn.Module, cfg: Qwen3Config) -> Iterator[tuple[str, mapping.ParamSpec, torch.Tensor]]:
    """This stage's parameters with their global names and mapping specs, in model order."""
    specs = mapping.param_specs(cfg, te=uses_te(model))
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        gname = mapping.global_name(name, offset)
        yield gname, mapping.spec_for(gname, specs, cfg), param


def load_hf_weights(
    model: torch.nn.Module,
    cfg: Qwen3Config,
    get_tensor: Callable[[str], torch.Tensor],
    on_param: Callable[[str], None] | None = None,
) -> None:
    """Fill this rank's model stage from HF tensors fetched one at a time by ``get_tensor``.

    Only the tensors this stage needs are read; each full tensor is dropped after its
    shard is copied, so memory stays at the stage size plus one layer's tensor.
    """
    tp_rank, tp, _ = _parallel()
    padded = padded_vocab_size(cfg.vocab_size, tp)
    with torch.no_grad():
        for gname, spec, param in local_params(model, cfg):
            full = mapping.to_megatron(spec, {n: get_tensor(n) for n in spec.hf}, cfg, padded)
            part = mapping.shard(spec, full, tp_rank, tp)
            if tuple(part.shape) != tuple(param.shape):
                raise ValueError(f"{gname}: HF tensors give shape {tuple(part.shape)}, model has {tuple(param.shape)}")
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
            full = mapping.unshard(spec, shards)
        else:
            full = data
        yield from mapping.to_hf(spec, full, cfg).items()


# --- offline conversion (the tools are thin wrappers around these) -----------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=__import__("sys").stderr)


def _log_rss(what: str) -> None:
    import os

    import psutil

    if os.environ.get("MEGATRON_KLEAR_DEBUG_MEMORY"):
        info = psutil.Process().memory_full_info()
        print(f"[rank {dist.get_rank()}] {what}: rss {info.rss / 1e9:.2f} GB, uss {info.uss / 1e9:.2f} GB", flush=True)


def _hf_to_megatron_worker(hf_dir: str, tmp: str, tp: int, pp: int) -> None:
    from pathlib import Path

    from megatron_klear.checkpoint.hf_io import HFReader, copy_side_files
    from megatron_klear.checkpoint.megatron_ckpt import save_model, write_marker
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed, is_main
    from megatron_klear.models.qwen3 import ModelOptions, build_model, load_hf_config

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        cfg = load_hf_config(hf_dir)
        reader = HFReader(hf_dir)
        _log_rss("start")
        model = build_model(cfg, ModelOptions(init_weights=False, use_te=False))
        _log_rss("built model")
        n = sum(1 for _ in model.parameters())
        with _progress(n, f"load HF (rank 0 of {tp * pp})", is_main()) as bar:
            load_hf_weights(model, cfg, reader.get, on_param=lambda _: bar.update())
        _log_rss("loaded HF weights")
        save_model(model, Path(tmp))
        _log_rss("saved")
        if is_main():
            copy_side_files(hf_dir, tmp)
        write_marker(Path(tmp), cfg, written_tp=tp, written_pp=pp, source=str(Path(hf_dir).absolute()))
        dist.barrier()
    finally:
        destroy_distributed()


def hf_to_megatron(hf_dir: str, out: str, tp: int = 1, pp: int = 1, force: bool = False) -> None:
    """Convert an HF Qwen3 directory into a Megatron-Core distributed checkpoint.

    Everything that can be checked (architecture, parallel sizes, every tensor present,
    output directory) is checked before any worker starts. The output appears only when
    complete. ``tp * pp`` local processes each read only their shard of every tensor.
    """
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.checkpoint.megatron_ckpt import atomic_dir, check_output_dir
    from megatron_klear.launch import spawn
    from megatron_klear.models.qwen3 import load_hf_config, validate_parallel

    cfg = load_hf_config(hf_dir)
    validate_parallel(cfg, tp, pp)
    HFReader(hf_dir).require(mapping.hf_tensor_names(cfg))
    check_output_dir(out, force)
    with atomic_dir(out, force, collective=False) as tmp:
        spawn(_hf_to_megatron_worker, tp * pp, hf_dir, str(tmp), tp, pp)


def _megatron_to_hf_worker(load: str, tmp: str, max_shard_bytes: int) -> None:
    import json
    from pathlib import Path

    from megatron_klear.checkpoint.hf_io import HFWriter, copy_side_files
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.qwen3 import ModelOptions, Qwen3Config, build_model

    init_distributed(ParallelConfig())
    try:
        raw = json.loads((Path(load) / "config.json").read_text())
        cfg = Qwen3Config.from_dict(raw, source=str(Path(load) / "config.json"))
        model = build_model(cfg, ModelOptions(init_weights=False, use_te=False))
        load_model(model, load)
        writer = HFWriter(tmp, max_shard_bytes=max_shard_bytes)
        n = len(mapping.hf_tensor_names(cfg))
        with _progress(n, "write HF", True) as bar:
            for name, tensor in iter_hf_weights(model, cfg):
                writer.add(name, tensor)
                bar.update()
        writer.close()
        (Path(tmp) / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        copy_side_files(load, tmp)
    finally:
        destroy_distributed()


def megatron_to_hf(load: str, out: str, force: bool = False, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Convert a Megatron checkpoint (written at any TP/PP) back into an HF directory."""
    from megatron_klear.checkpoint.megatron_ckpt import atomic_dir, check_output_dir, read_marker
    from megatron_klear.launch import spawn

    read_marker(load)
    check_output_dir(out, force)
    with atomic_dir(out, force, collective=False) as tmp:
        spawn(_megatron_to_hf_worker, 1, load, str(tmp), max_shard_bytes)
