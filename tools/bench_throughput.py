#!/usr/bin/env python
"""Training throughput of a model shape and parallel layout: tokens/s per device, step-time
breakdown, and model FLOPs utilisation.

    torchrun --nproc-per-node N tools/bench_throughput.py --mode sft [--shape tiny|0.6b|1.7b|8b]
        [--seq-len 4096] [--steps 6] [--tp 1 --pp 1 --cp 1] [--sequence-parallel]
        [--recompute full|selective] [--recompute-modules mlp] [--recompute-method uniform|block]
        [--recompute-num-layers N] [--fp8 hybrid|e4m3] [--peak-tflops 989] [--json OUT.json]

Random weights of the named Qwen3 shape (no download). Each packed sequence holds three
documents (1/3, 1/6 and 1/2 of it, aligned to 2 x cp): model FLOPs count causal attention within
documents (``training.metrics.model_flops``). Sequence parallel, context parallel and FP8 need
Transformer Engine; without it the torch-native layers run.

    torchrun --nproc-per-node N tools/bench_throughput.py --mode rl --config examples/tiny/rl_math.yaml
        [--steps 2] [--json OUT.json] [key=value ...]

``--mode rl`` runs that RL config for ``--steps`` steps (no evaluation, no export, a fresh
output directory) and reports the time per phase (generate, reward wait, old log-probs,
train, sync) and the generated tokens/s of each step, from the run's own metrics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_klear.config import load_config
from megatron_klear.data.sft import PackedSample
from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed, is_main
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.hf_mapping import num_params
from megatron_klear.models.qwen3 import (
    FP8_RECIPES,
    RECOMPUTE,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    ModelOptions,
    have_transformer_engine,
)
from megatron_klear.models.shapes import QWEN3_SHAPES, qwen3_config_dict
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.trainer import train
from megatron_klear.sft import check_sequence_layout, nll_loss
from megatron_klear.training.batches import micro_batch
from megatron_klear.training.metrics import model_flops
from megatron_klear.training.state import OptimConfig, build_train_state
from megatron_klear.training.step import forward_backward, optimizer_step

RL_PHASES = ("time/generate_s", "time/reward_wait_s", "time/old_logprobs_s", "time/train_s", "time/sync_s")


def bench_rl(a) -> int:
    """Run ``a.steps`` RL steps of ``a.config`` and report its per-phase times."""
    import os

    import torch.distributed as dist

    # one directory for all ranks: torchrun gives every rank of a launch the same run id
    out = Path("runs/bench_rl") / os.environ.get("TORCHELASTIC_RUN_ID", "run")
    fixed = [f"output_dir={out}", f"train_steps={a.steps}", "eval.at_start=false", "eval.at_end=false"]
    fixed += ["eval.interval=0", "checkpoint.export_hf=false", f"checkpoint.save_interval={a.steps + 1}"]
    cfg = load_config(RLConfig, a.config, list(a.overrides) + fixed)
    train(cfg)
    if is_main():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(f"RL step phases, {a.config} ({' '.join(a.overrides)}), world size {dist.get_world_size()}")
        print("| step | step s | generate s | reward wait s | old log-probs s | train s | sync s | gen tokens/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            cells = [r["time/step_s"]] + [r[k] for k in RL_PHASES] + [r["perf/tokens_per_s"]]
            print(f"| {r['step']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        result = dict(mode="rl", config=a.config, overrides=a.overrides, world=dist.get_world_size(), steps=rows)
        Path(a.json).write_text(json.dumps(result, indent=2))

    destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sft", "rl"], default="sft")
    p.add_argument("--shape", choices=sorted(QWEN3_SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context parallel (Transformer Engine)")
    p.add_argument("--sequence-parallel", action="store_true", help="needs --tp > 1 (Transformer Engine)")
    p.add_argument("--recompute", choices=RECOMPUTE, default=None)
    p.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None)
    p.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default="uniform")
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--fp8", choices=FP8_RECIPES, default=None, help="Transformer Engine FP8 recipe")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--logprob-impl", default="torch", choices=["torch", "triton"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU (H100 SXM bf16: 989)")
    p.add_argument("--json", default="bench_throughput.json")
    p.add_argument("--config", default="examples/tiny/rl_math.yaml", help="--mode rl: the RL config")
    p.add_argument("overrides", nargs="*", help="--mode rl: config overrides key=value")
    a = p.parse_args(argv)
    if a.mode == "rl":
        return bench_rl(a)

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    par = ParallelConfig(a.tp, a.pp, sequence_parallel=a.sequence_parallel, context_parallel=a.cp)
    opts = ModelOptions(
        use_te=have_transformer_engine(),
        fp8=a.fp8,
        recompute=a.recompute,
        recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        recompute_modules=a.recompute_modules,
    )
    L = a.seq_len
    try:  # every layout error before the process group starts
        par.validate()
        opts.validate()
        check_sequence_layout(L, par, "--seq-len")
    except ConfigError as e:
        p.error(str(e))
    init_distributed(par)
    dtype = a.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    hf = Qwen3Config.from_dict(qwen3_config_dict(a.shape, dtype, max(40960, a.seq_len)))
    use_te = opts.use_te
    engine = build_train_state(
        hf, opts, OptimConfig(lr=1e-5, min_lr=1e-5), a.steps, sequence_parallel=a.sequence_parallel
    )
    rng = np.random.default_rng(0)
    align = 2 * a.cp if a.cp > 1 else 1
    docs = [0] + [int(L * f) // align * align for f in (1 / 3, 1 / 2)] + [L]  # three packed documents
    lengths = np.diff(docs)

    def sample():
        ids = rng.integers(0, hf.vocab_size, L)
        pos = np.concatenate([np.arange(n) for n in lengths])
        return PackedSample(ids, np.roll(ids, -1), np.ones(L, np.float32), pos, np.asarray(docs, np.int32))

    cp_rank = ps.get_context_parallel_rank()
    micro = [micro_batch([sample()], use_te, a.cp, cp_rank) for _ in range(a.micro_batches)]
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
    packs = a.micro_batches * dp  # in the global batch, each with `lengths` real tokens
    tok_s_dev = packs * int(lengths.sum()) / warm["step"] / world
    flops_s_dev = packs * model_flops(hf, lengths) / warm["step"] / world
    result = dict(
        mode=a.mode,
        shape=a.shape,
        params=num_params(hf),
        seq_len=L,
        micro_batches=a.micro_batches,
        tp=a.tp,
        pp=a.pp,
        cp=a.cp,
        dp=dp,
        sequence_parallel=a.sequence_parallel,
        recompute=a.recompute,
        recompute_modules=a.recompute_modules,
        recompute_method=a.recompute_method if a.recompute == "full" else None,
        recompute_num_layers=a.recompute_num_layers,
        fp8=a.fp8,
        documents=lengths.tolist(),
        devices=world,
        dtype=dtype,
        transformer_engine=use_te,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        step_s=warm["step"],
        forward_backward_s=warm["forward_backward"],
        optimizer_s=warm["optimizer"],
        tokens_per_s_per_device=tok_s_dev,
        model_tflops_per_device=flops_s_dev / 1e12,
        mfu=(flops_s_dev / (a.peak_tflops * 1e12)) if a.peak_tflops else None,
        max_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
    )
    if is_main():
        print(
            f"{a.shape} ({num_params(hf) / 1e6:.2f}M params) seq {L} x {a.micro_batches} micro-batches, "
            f"tp={a.tp} pp={a.pp} cp={a.cp} dp={dp} sp={a.sequence_parallel} recompute={a.recompute} "
            f"{a.recompute_modules or ''} fp8={a.fp8} on {result['device']}, {dtype}, TE={use_te}"
        )
        print("| step s | fwd+bwd s | optimizer s | tokens/s/device | model TFLOP/s/device | MFU |")
        print("|---:|---:|---:|---:|---:|---:|")
        mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
        print(
            f"| {warm['step']:.3f} | {warm['forward_backward']:.3f} | {warm['optimizer']:.3f} | {tok_s_dev:.0f} | "
            f"{result['model_tflops_per_device']:.3f} | {mfu} |"
        )
        Path(a.json).write_text(json.dumps(result, indent=2))

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
