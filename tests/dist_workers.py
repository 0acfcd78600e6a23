"""Functions run inside spawned process groups by the tests (importable by child processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def logits_worker(tp: int, pp: int, ckpts: list[str], ids_path: str, out_dir: str) -> None:
    """For each checkpoint: load at tp x pp, forward, and save the logits from rank 0."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.forward import forward_logits, send_to_rank0
    from megatron_klear.models.qwen3 import ModelOptions, Qwen3Config, build_model

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        ids = torch.tensor(json.loads(Path(ids_path).read_text()))
        for ck in ckpts:
            cfg = Qwen3Config.from_dict(json.loads((Path(ck) / "config.json").read_text()))
            model = build_model(cfg, ModelOptions(init_weights=False))
            load_model(model, ck)
            out = send_to_rank0(forward_logits(model, ids, cfg.vocab_size))
            if torch.distributed.get_rank() == 0:
                torch.save(out, Path(out_dir) / f"{Path(ck).name}_tp{tp}_pp{pp}.pt")
    finally:
        destroy_distributed()
