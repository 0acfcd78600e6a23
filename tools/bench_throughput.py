#!/usr/bin/env python
"""Training throughput of a model shape and parallel layout: tokens/s per device, step-time
breakdown, and model FLOPs utilisation.

    torchrun --nproc-per-node N tools/bench_throughput.py --mode sft [--shape tiny|0.6b|1.7b|8b|tiny-moe|30b-a3b]
        [--seq-len 4096] [--steps 6] [--tp 1 --pp 1 --cp 1 --ep 1 --etp 1] [--sequence-parallel]
        [--recompute full|selective] [--recompute-modules mlp] [--recompute-method uniform|block]
        [--recompute-num-layers N] [--fp8 hybrid|e4m3] [--peak-tflops 989] [--json OUT.json]

Random weights of the named Qwen3 shape (no download). Each packed sequence holds three
documents (1/3, 1/6 and 1/2 of it, aligned to 2 x cp): model FLOPs count causal attention within
documents (``training.metrics.model_flops``; a Qwen3-MoE shape counts the top-k experts a token
passes, not all). Sequence parallel, context parallel and FP8 need Transformer Engine; without
it the torch-native layers run. ``--ep`` / ``--etp``: expert (tensor) parallel of a MoE shape.

    torchrun --nproc-per-node N tools/bench_throughput.py --mode rl --config examples/tiny/rl_math.yaml
        [--steps 2] [--json OUT.json] [key=value ...]

``--mode rl`` runs that RL config for ``--steps`` steps (no evaluation, no export, a fresh
output directory) and reports the time per phase (generate, reward wait, old log-probs,
train, sync) and the generated tokens/s of each step, from the run's own metrics.

    python tools/bench_throughput.py --mode rl-train [--shape tiny|small|0.6b] [--max-len 2048]
        [--seqs 64] [--budgets 1,2] [--dp 1 --tp 1 --pp 1] [--repeats 2] [--json OUT.json]

``--mode rl-train`` times the RL update of one mini-batch (old log-probs, then one optimizer
step of the GPPO loss) on random weights, with long-CoT-like lengths: responses log-normal
(median 1/6 of the longest, sigma 1), prompts uniform up to 1/9 of ``--max-len``, and 1 in 32
sequences (at least one) at the cap of ``--max-len`` tokens. Layouts: padded (one sequence
per micro-batch, right-padded to the longest, as ``micro_batch_size: 1`` does) and packed with
token budgets of ``--budgets`` x ``--max-len``. Each layout runs in fresh processes; reported:
sequence tokens/s, pack fill, micro-batches per rank, and peak memory (GPU: max allocated;
CPU: the peak resident memory above the process's resident memory before the update, sampled
every 2 ms; the most over the repeats).
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
from megatron_klear.data.sft import assemble_pack
from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed, is_main, spawn
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config, validate_training_layout
from megatron_klear.models.hf_mapping import active_params, num_params
from megatron_klear.models.qwen3 import (
    FP8_FORMATS,
    FP8_RECIPES,
    RECOMPUTE,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    ModelOptions,
    fp8_sequence_multiple,
    have_transformer_engine,
)
from megatron_klear.models.shapes import QWEN3_SHAPES, qwen3_config_dict
from megatron_klear.ops.loss import nll_loss
from megatron_klear.rl.batch import minibatches
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.rollout import Sample
from megatron_klear.rl.trainer import train
from megatron_klear.rl.update import update_policy
from megatron_klear.sft.config import check_sequence_layout
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


def rl_train_lengths(n: int, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) lengths of a long-CoT-like mini-batch (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    max_prompt = max_len // 9  # 4K prompts + 32K responses in the paper's runs
    max_response = max_len - max_prompt
    responses = np.clip(np.round(rng.lognormal(np.log(max_response / 6), 1.0, n)), 1, max_response)
    prompts = rng.integers(max(1, max_prompt // 8), max_prompt + 1, n)
    capped = rng.choice(n, max(1, n // 32), replace=False)  # a few hit the length cap, prompt included
    responses[capped], prompts[capped] = max_response, max_prompt
    return [(int(p), int(r)) for p, r in zip(prompts, responses)]


def rl_train_groups(lengths: list[tuple[int, int]], vocab: int, seed: int = 0) -> list:
    """Groups of 8 samples with random tokens and engine log-probs, advantages +-1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = []
    for k, (p, r) in enumerate(lengths):
        ids = rng.integers(0, vocab, p + r).tolist()
        eng = (-rng.random(r) * 3).tolist()
        correct = bool(k % 2)
        adv = 1.0 if correct else -1.0
        samples.append(Sample(f"u{k // 8}", ids[:p], ids[p:], eng, "stop", float(correct), correct, "", adv))
    return [samples[i : i + 8] for i in range(0, len(samples), 8)]


class PeakRSS:
    """The peak resident memory of this process above its level at start, sampled in a thread."""

    def __init__(self, every_s: float = 0.002):
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        """Stop sampling; returns the peak above the start in GB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return (self.peak - self.base) / 1e9


def rl_train_child(a: dict, layout: dict, out: str) -> None:
    """One layout in fresh processes: build the model, time ``a['repeats']`` RL updates of the
    mini-batch, and write the row (rank 0)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    init_distributed(ParallelConfig(a["tp"], a["pp"]))
    try:
        gpu = torch.cuda.is_available()
        dtype = a["dtype"] or ("bfloat16" if gpu else "float32")
        hf = Qwen3Config.from_dict(qwen3_config_dict(a["shape"], dtype, max(40960, a["max_len"])))
        use_te = have_transformer_engine()
        optim = OptimConfig(lr=1e-6, min_lr=1e-6, decay_style="constant")
        state = build_train_state(hf, ModelOptions(use_te=use_te), optim, a["repeats"])
        groups = rl_train_groups(rl_train_lengths(a["seqs"], a["max_len"]), hf.vocab_size)
        cfg = RLConfig(output_dir=a["out_dir"])  # the default algorithm: GPPO, token-mean, alpha 0.1
        cfg.model.logprob_impl = a["logprob_impl"]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        times, peaks = [], []
        for _ in range(a["repeats"]):
            [mini] = minibatches(groups, len(groups), dp, dp_rank, 1, max_seq_len=hf.max_position_embeddings,
                                 use_te=use_te, max_tokens=layout["budget"])  # fmt: skip
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            sync()
            rss = PeakRSS()
            m = update_policy(state, [mini], cfg, hf.vocab_size, Path(a["out_dir"]), 1, {})
            sync()
            cpu_peak = rss.stop()
            peaks.append(torch.cuda.max_memory_allocated() / 1e9 if gpu else cpu_peak)
            times.append((m["time/old_logprobs_s"], m["time/train_s"]))
        old_s, train_s = (statistics.median(t[i] for t in (times[1:] or times)) for i in (0, 1))
        tokens = sum(mini.layout.rank_tokens)
        row = dict(
            layout=layout["name"],
            budget=layout["budget"],
            micro_batches_per_rank=mini.layout.micro_batches,
            fill=mini.layout.fill,
            rank_tokens_max=max(mini.layout.rank_tokens),
            tokens=tokens,
            old_logprobs_s=old_s,
            train_s=train_s,
            tokens_per_s=tokens / (old_s + train_s),
            peak_memory_gb=max(peaks),
            memory="max allocated (GPU)" if gpu else "peak RSS above the start of the update (CPU)",
            dtype=dtype,
            device=torch.cuda.get_device_name() if gpu else "cpu",
            transformer_engine=use_te,
        )
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(row))
    finally:
        destroy_distributed()


def bench_rl_train(a) -> int:
    """Padded vs packed RL updates of one long-tailed mini-batch; prints a table, writes JSON."""
    import tempfile

    lengths = rl_train_lengths(a.seqs, a.max_len)
    layouts = [dict(name="padded, 1 sequence per micro-batch", budget=None)]
    layouts += [dict(name=f"packed, {b} x max-len", budget=int(float(b) * a.max_len)) for b in a.budgets.split(",")]
    args = dict(vars(a), out_dir=tempfile.mkdtemp(prefix="bench_rl_train_"))
    rows = []
    for layout in layouts:
        out = Path(args["out_dir"]) / "row.json"
        spawn(rl_train_child, a.dp * a.tp * a.pp, args, layout, str(out))
        rows.append(json.loads(out.read_text()))
    total = sum(p + r for p, r in lengths)
    print(
        f"RL update of one mini-batch: {a.shape}, {a.seqs} sequences, {total} tokens (longest allowed {a.max_len}, "
        f"median {statistics.median(p + r for p, r in lengths):.0f}, {sum(p + r == a.max_len for p, r in lengths)} "
        f"at the cap), dp={a.dp} tp={a.tp} pp={a.pp}, {rows[0]['device']}, {rows[0]['dtype']}"
    )
    print("| layout | micro-batches/rank | fill | old log-probs s | train s | tokens/s | vs padded | peak memory GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['micro_batches_per_rank']} | {r['fill']:.3f} | {r['old_logprobs_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
            f"{r['peak_memory_gb']:.2f} |"
        )
    result = dict(mode="rl-train", shape=a.shape, max_len=a.max_len, seqs=a.seqs, dp=a.dp, tp=a.tp, pp=a.pp,
                  repeats=a.repeats, lengths=lengths, rows=rows)  # fmt: skip
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sft", "rl", "rl-train"], default="sft")
    p.add_argument("--shape", choices=sorted(QWEN3_SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context parallel (Transformer Engine)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel (MoE shapes)")
    p.add_argument("--etp", type=int, default=1, help="expert tensor parallel (MoE shapes)")
    p.add_argument("--sequence-parallel", action="store_true", help="needs --tp > 1 (Transformer Engine)")
    p.add_argument("--recompute", choices=RECOMPUTE, default=None)
    p.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None)
    p.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default="uniform")
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--fp8", choices=FP8_FORMATS, default=None, help="Transformer Engine FP8 format")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="tensorwise", help="FP8 scaling recipe")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--logprob-impl", default="torch", choices=["torch", "triton"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU (H100 SXM bf16: 989)")
    p.add_argument("--json", default="bench_throughput.json")
    p.add_argument("--config", default="examples/tiny/rl_math.yaml", help="--mode rl: the RL config")
    p.add_argument("overrides", nargs="*", help="--mode rl: config overrides key=value")
    p.add_argument("--max-len", type=int, default=2048, help="--mode rl-train: longest prompt + response")
    p.add_argument("--seqs", type=int, default=64, help="--mode rl-train: sequences in the mini-batch")
    p.add_argument("--budgets", default="1,2", help="--mode rl-train: token budgets, multiples of --max-len")
    p.add_argument("--dp", type=int, default=1, help="--mode rl-train: data-parallel ranks")
    p.add_argument("--repeats", type=int, default=2, help="--mode rl-train: updates per layout (first is warm-up)")
    a = p.parse_args(argv)
    if a.mode == "rl":
        return bench_rl(a)
    if a.mode == "rl-train":
        return bench_rl_train(a)

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    par = ParallelConfig(
        a.tp,
        a.pp,
        sequence_parallel=a.sequence_parallel,
        context_parallel=a.cp,
        expert_parallel=a.ep,
        expert_tensor_parallel=a.etp,
    )
    opts = ModelOptions(
        use_te=have_transformer_engine(),
        fp8=a.fp8,
        fp8_recipe=a.fp8_recipe,
        recompute=a.recompute,
        recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        recompute_modules=a.recompute_modules,
    )
    L = a.seq_len
    dtype = a.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    hf = Qwen3Config.from_dict(qwen3_config_dict(a.shape, dtype, max(40960, a.seq_len)))
    try:  # every layout error before the process group starts
        par.validate()
        opts.validate()
        check_sequence_layout(L, par, "--seq-len")
        multiple = fp8_sequence_multiple(a.tp, a.sequence_parallel, a.cp)
        if a.fp8 and L % multiple:
            raise ConfigError(f"--seq-len {L} must be a multiple of {multiple} with --fp8 (FP8 GEMM alignment)")
        validate_training_layout(hf, par)
    except ConfigError as e:
        p.error(str(e))
    init_distributed(par)
    use_te = opts.use_te
    engine = build_train_state(
        hf, opts, OptimConfig(lr=1e-5, min_lr=1e-5), a.steps, sequence_parallel=a.sequence_parallel
    )
    rng = np.random.default_rng(0)
    align = 2 * a.cp if a.cp > 1 else 1
    docs = [0] + [int(L * f) // align * align for f in (1 / 3, 1 / 2)] + [L]  # three packed documents
    lengths = np.diff(docs)

    def sample():  # every token of each document trained on (labels within the document)
        return assemble_pack([(rng.integers(0, hf.vocab_size, n), np.ones(n, np.float32)) for n in lengths], L)

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
        active_params=active_params(hf),
        seq_len=L,
        micro_batches=a.micro_batches,
        tp=a.tp,
        pp=a.pp,
        cp=a.cp,
        ep=a.ep,
        etp=a.etp,
        dp=dp,
        sequence_parallel=a.sequence_parallel,
        recompute=a.recompute,
        recompute_modules=a.recompute_modules,
        recompute_method=a.recompute_method if a.recompute == "full" else None,
        recompute_num_layers=a.recompute_num_layers,
        fp8=a.fp8,
        fp8_recipe=a.fp8_recipe if a.fp8 else None,
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
            f"tp={a.tp} pp={a.pp} cp={a.cp} ep={a.ep} etp={a.etp} dp={dp} sp={a.sequence_parallel} "
            f"recompute={a.recompute} {a.recompute_modules or ''} "
            f"fp8={a.fp8}{'/' + a.fp8_recipe if a.fp8 else ''} on {result['device']}, {dtype}, TE={use_te}"
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
