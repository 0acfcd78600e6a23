#!/usr/bin/env python
"""Gather + bucket throughput of trainer weights for the rollout engines.

    torchrun --nproc-per-node N tools/bench_weight_sync.py [--shape 0.6b] [--tp 2 --pp 2]
        [--bucket-mb 512] [--json OUT.json]

Random weights of a Qwen3 shape; every rank of DP replica 0 gathers, rank 0 receives the
buckets. Reports GB/s of HF tensors delivered and the peak extra memory per rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.hf_mapping import num_params
from megatron_klear.models.qwen3 import ModelOptions, build_model
from megatron_klear.models.shapes import QWEN3_SHAPES, qwen3_config_dict
from megatron_klear.sync.gather import gather_hf_buckets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(QWEN3_SHAPES), default="0.6b")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--json", default="bench_weight_sync.json")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    init_distributed(ParallelConfig(a.tp, a.pp))
    extra = {"num_hidden_layers": a.layers} if a.layers else {}
    dtype = "bfloat16"
    cfg = Qwen3Config.from_dict(qwen3_config_dict(a.shape, dtype, **extra))
    model = build_model(cfg, ModelOptions(), init_weights=False)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak_rss = rss0
    dist.barrier()
    t = time.perf_counter()
    nbytes, n_buckets = 0, 0
    for bucket in gather_hf_buckets(model, cfg, a.bucket_mb * 2**20):
        n_buckets += 1
        nbytes += sum(x.numel() * x.element_size() for _, x in bucket)
        peak_rss = max(peak_rss, proc.memory_info().rss)
        del bucket
    if gpu:
        torch.cuda.synchronize()
    dist.barrier()
    secs = time.perf_counter() - t
    peak_rss = max(peak_rss, proc.memory_info().rss)
    extra_mb = ((torch.cuda.max_memory_allocated() - base) if gpu else (peak_rss - rss0)) / 2**20
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, extra_mb)
    if dist.get_rank() == 0:
        res = dict(
            shape=a.shape,
            params=num_params(cfg),
            tp=a.tp,
            pp=a.pp,
            bucket_mb=a.bucket_mb,
            device=torch.cuda.get_device_name() if gpu else "cpu",
            seconds=secs,
            gbytes=nbytes / 1e9,
            buckets=n_buckets,
            gb_per_s=nbytes / 1e9 / secs,
            peak_extra_mb_per_rank=gathered,
        )
        print(
            f"{a.shape} ({num_params(cfg) / 1e9:.2f}B, {nbytes / 1e9:.2f} GB bf16) tp={a.tp} pp={a.pp} "
            f"bucket {a.bucket_mb} MB on {res['device']}"
        )
        print("| seconds | GB/s | buckets | peak extra MB per rank |\n|---:|---:|---:|---|")
        print(f"| {secs:.2f} | {res['gb_per_s']:.2f} | {n_buckets} | {', '.join(f'{x:.0f}' for x in gathered)} |")
        Path(a.json).write_text(json.dumps(res, indent=2))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
