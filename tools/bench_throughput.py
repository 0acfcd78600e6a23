#!/usr/bin/env python
"""Training throughput of a model shape and parallel layout: tokens/s per device, step-time
breakdown, and model FLOPs utilisation.

    torchrun --nproc-per-node N tools/bench_throughput.py --mode sft [--shape tiny|0.6b|1.7b|8b]
        [--seq-len 4096] [--steps 6] [--tp 1 --pp 1] [--peak-tflops 989] [--json OUT.json]

Random weights of the named Qwen3 shape (no download). ``--mode rl`` is not available until
the RL loop lands.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.models.shapes import QWEN3_SHAPES, qwen3_config_dict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sft", "rl"], default="sft")
    p.add_argument("--shape", choices=sorted(QWEN3_SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--logprob-impl", default="torch", choices=["torch", "triton"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU (H100 SXM bf16: 989)")
    p.add_argument("--json", default="bench_throughput.json")
    a = p.parse_args(argv)
    if a.mode == "rl":
        print("pending: --mode rl needs the RL loop (issue: The GPPO RL loop), which has not landed yet")
        return 2

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_klear.data.sft import PackedSample
    from megatron_klear.distributed import ParallelConfig, init_distributed, is_main
    from megatron_klear.models.qwen3 import ModelOptions, Qwen3Config, have_transformer_engine
    from megatron_klear.sft import model_flops_per_token, nll_loss
    from megatron_klear.training.batches import micro_batch
    from megatron_klear.training.engine import OptimConfig, build_engine, forward_backward, optimizer_step

    init_distributed(ParallelConfig(a.tp, a.pp))
    dtype = a.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    hf = Qwen3Config.from_dict(qwen3_config_dict(a.shape, dtype, max(40960, a.seq_len)))
    use_te = have_transformer_engine()
    engine = build_engine(hf, ModelOptions(use_te=use_te), OptimConfig(lr=1e-5, min_lr=1e-5), a.steps)
    rng = np.random.default_rng(0)
    L = a.seq_len
    docs = [0, L // 3, L // 2, L]  # three packed documents per sequence

    def sample():
        ids = rng.integers(0, hf.vocab_size, L)
        pos = np.concatenate([np.arange(b - s) for s, b in zip(docs[:-1], docs[1:])])
        return PackedSample(ids, np.roll(ids, -1), np.ones(L, np.float32), pos, np.asarray(docs, np.int32))

    micro = [micro_batch([sample()], use_te) for _ in range(a.micro_batches)]
    loss_fn = nll_loss(hf.vocab_size, a.logprob_impl)
    times = {"forward_backward": [], "optimizer": [], "step": []}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        forward_backward(engine, micro, loss_fn)
        sync()
        t1 = time.perf_counter()
        optimizer_step(engine)
        sync()
        t2 = time.perf_counter()
        times["forward_backward"].append(t1 - t0)
        times["optimizer"].append(t2 - t1)
        times["step"].append(t2 - t0)
    warm = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    world = dist.get_world_size()
    dp = ps.get_data_parallel_world_size()
    tokens = L * a.micro_batches * dp
    tok_s_dev = tokens / warm["step"] / world
    flops = model_flops_per_token(hf, L)
    result = dict(
        mode=a.mode,
        shape=a.shape,
        params=hf.num_params,
        seq_len=L,
        micro_batches=a.micro_batches,
        tp=a.tp,
        pp=a.pp,
        dp=dp,
        devices=world,
        dtype=dtype,
        transformer_engine=use_te,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        step_s=warm["step"],
        forward_backward_s=warm["forward_backward"],
        optimizer_s=warm["optimizer"],
        tokens_per_s_per_device=tok_s_dev,
        model_tflops_per_device=tok_s_dev * flops / 1e12,
        mfu=(tok_s_dev * flops / (a.peak_tflops * 1e12)) if a.peak_tflops else None,
        max_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
    )
    if is_main():
        print(
            f"{a.shape} ({hf.num_params / 1e6:.2f}M params) seq {L} x {a.micro_batches} micro-batches, "
            f"tp={a.tp} pp={a.pp} dp={dp} on {result['device']}, {dtype}, TE={use_te}"
        )
        print("| step s | fwd+bwd s | optimizer s | tokens/s/device | model TFLOP/s/device | MFU |")
        print("|---:|---:|---:|---:|---:|---:|")
        mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
        print(
            f"| {warm['step']:.3f} | {warm['forward_backward']:.3f} | {warm['optimizer']:.3f} | {tok_s_dev:.0f} | "
            f"{result['model_tflops_per_device']:.3f} | {mfu} |"
        )
        Path(a.json).write_text(json.dumps(result, indent=2))
    from megatron_klear.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
