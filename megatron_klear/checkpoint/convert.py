"""Offline conversion: HF safetensors <-> Megatron-Core distributed checkpoint.

Everything that can be checked is checked before any worker starts; the output is written under
a temporary name and appears only when complete. The tensors move through ``models.weights``
(the one HF <-> Megatron mapping); the tools in ``tools/`` are thin wrappers around these.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from megatron_klear.checkpoint.hf_io import HFReader, HFWriter, copy_side_files, write_generation_config
from megatron_klear.checkpoint.megatron_ckpt import (
    atomic_dir,
    check_output_dir,
    load_model,
    read_marker,
    save_model,
    write_marker,
)
from megatron_klear.distributed import NO_GPU_ENV, ParallelConfig, destroy_distributed, init_distributed, is_main, spawn
from megatron_klear.models import hf_mapping
from megatron_klear.models.config import Qwen3Config, load_hf_config, validate_parallel
from megatron_klear.models.qwen3 import ModelOptions, build_model
from megatron_klear.models.weights import check_hf_shapes, iter_hf_weights, load_hf_weights

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


def _hf_to_megatron_worker(hf_dir: str, tmp: str, tp: int, pp: int, ep: int = 1) -> None:
    from pathlib import Path

    init_distributed(ParallelConfig(tp=tp, pp=pp, expert_parallel=ep))
    try:
        cfg = load_hf_config(hf_dir)
        reader = HFReader(hf_dir)
        _log_rss("start")
        model = build_model(cfg, ModelOptions(use_te=False), init_weights=False)
        _log_rss("built model")
        n = sum(1 for _ in model.parameters())
        with _progress(n, f"load HF (rank 0 of {tp * pp * ep})", is_main()) as bar:
            load_hf_weights(model, cfg, reader.get, on_param=lambda _: bar.update(), source=hf_dir)
        _log_rss("loaded HF weights")
        save_model(model, Path(tmp))
        _log_rss("saved")
        if is_main():
            copy_side_files(hf_dir, tmp)
        write_marker(Path(tmp), cfg, written_tp=tp, written_pp=pp, written_ep=ep, source=str(Path(hf_dir).absolute()))
        dist.barrier()
    finally:
        destroy_distributed()


def hf_to_megatron(hf_dir: str, out: str, tp: int = 1, pp: int = 1, force: bool = False, ep: int = 1) -> None:
    """Convert an HF Qwen3 (or Qwen3-MoE) directory into a Megatron-Core distributed checkpoint.

    Everything that can be checked (architecture, parallel sizes, every tensor present,
    output directory) is checked before any worker starts. The output appears only when
    complete. ``tp * pp * ep`` local processes each read only their shard of every tensor
    (with ``ep``, its 1/ep of the experts; the dense tensors once per expert-parallel rank).
    """

    check_output_dir(out, force, inputs=(hf_dir,))
    cfg = load_hf_config(hf_dir)
    validate_parallel(cfg, tp, pp, ep)
    reader = HFReader(hf_dir)
    reader.require(hf_mapping.hf_tensor_names(cfg))
    check_hf_shapes(cfg, reader.shape, hf_dir)
    with atomic_dir(out, force, collective=False) as tmp:
        spawn(_hf_to_megatron_worker, tp * pp * ep, hf_dir, str(tmp), tp, pp, ep)


def _megatron_to_hf_worker(load: str, tmp: str, max_shard_bytes: int, sampling: Optional[dict]) -> None:
    import json
    import os
    from pathlib import Path

    # The export runs on the CPU: at the end of a run it sits beside the trainer's processes,
    # whose cached memory still fills GPU 0.
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        raise AssertionError("the Megatron -> HF worker must be spawned with NO_GPU_ENV (no GPU visible)")
    init_distributed(ParallelConfig())
    try:
        raw = json.loads((Path(load) / "config.json").read_text())
        cfg = Qwen3Config.from_dict(raw, source=str(Path(load) / "config.json"))
        model = build_model(cfg, ModelOptions(use_te=False), init_weights=False)
        load_model(model, load)
        writer = HFWriter(tmp, max_shard_bytes=max_shard_bytes)
        n = len(hf_mapping.hf_tensor_names(cfg))
        with _progress(n, "write HF", True) as bar:
            for name, tensor in iter_hf_weights(model, cfg):
                # in the checkpoint's dtype: Megatron's torch-native RMSNorm keeps its weights in
                # float32 whatever the model's dtype; they were bf16 values if the source was bf16
                writer.add(name, tensor.to(cfg.torch_dtype) if tensor.is_floating_point() else tensor)
                bar.update()
        writer.close()
        (Path(tmp) / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        copy_side_files(load, tmp)
        if sampling is not None:
            write_generation_config(tmp, **sampling)
    finally:
        destroy_distributed()


def megatron_to_hf(
    load: str,
    out: str,
    force: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    sampling: Optional[dict] = None,
) -> None:
    """Convert a Megatron checkpoint (written at any TP/PP) back into an HF directory.

    The conversion runs in one child process that sees no GPU (the end-of-run export must not
    allocate on GPU 0 beside the trainer; a CPU reads and writes the tensors as fast as the disk).

    ``sampling`` (``temperature``, ``top_p``, ``top_k``): written into the exported
    generation_config.json (see ``hf_io.write_generation_config``); None copies the source's.
    """

    check_output_dir(out, force, inputs=(load,))
    read_marker(load)
    with atomic_dir(out, force, collective=False) as tmp:
        spawn(_megatron_to_hf_worker, 1, load, str(tmp), max_shard_bytes, sampling, env=NO_GPU_ENV)
