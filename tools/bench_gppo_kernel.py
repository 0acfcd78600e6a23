#!/usr/bin/env python
"""Vocab-parallel log-prob + entropy + GPPO loss: forward / backward / total time and memory.

    python tools/bench_gppo_kernel.py [--json OUT.json] [--iters 50]
    python tools/bench_gppo_kernel.py --device cpu --tokens 256 --vocab 4096 --impls eager   # smoke run

Implementations: (a) torch eager reference, (b) torch.compile of the reference, (c) our
Triton kernel. Shapes: tokens in {4096, 16384, 32768} x local vocab in {151936, 37984}
(Qwen3 at TP=1 and TP=4), bf16 logits. Reports achieved bytes/s against the floor of
6 bytes per logit element (logits read twice, bf16 gradient written once) at the measured
device-to-device copy bandwidth, and peak memory beyond logits and gradient.

Every row's memory estimate (``training.memory.logprob_kernel_memory``) is printed before it
runs; a row above the GPU's free memory (``--free-gib``, default: what is free now) is recorded
as "does not fit" and not run, and one that runs out of memory anyway as "out of memory"; both
are rows of the table, not failures. Any other error stops the script with its traceback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.ops.logprobs import vocab_parallel_logprobs
from megatron_klear.ops.loss import policy_loss
from megatron_klear.training.memory import logprob_kernel_memory


def make_step(impl: str):
    kernel = "triton" if impl == "triton" else "torch"

    def step(logits, targets, old, adv, mask):
        logp, ent = vocab_parallel_logprobs(logits, targets, with_entropy=True, impl=kernel)
        loss, _ = policy_loss(logp.view(mask.shape), old, adv, mask)
        return loss - 0.001 * ent.mean()

    return torch.compile(step) if impl == "compile" else step


class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    timer = Timer(device)
    times = [timer(lambda: y.copy_(x)) for _ in range(10)]
    return 2 * x.numel() / statistics.median(times[2:])


def bench_one(impl, tokens, vocab, device, iters):
    g = torch.Generator(device=device).manual_seed(0)  # on the device: 5e9 logits take long on a CPU
    logits = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.bfloat16) * 2).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    rows = 4
    shape = (rows, tokens // rows)
    old = -torch.rand(shape, generator=g, device=device) * 3
    adv = torch.randn(rows, 1, generator=g, device=device)
    mask = torch.ones(shape, device=device)
    step = make_step(impl)
    timer = Timer(device)
    fwd, bwd = [], []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() + logits.numel() * logits.element_size()  # + gradient
    for i in range(iters + 3):
        logits.grad = None
        out = {}
        f = timer(lambda: out.setdefault("loss", step(logits, targets, old, adv, mask)))
        b = timer(lambda: out["loss"].backward())
        if i >= 3:  # warm-up (and compilation)
            fwd.append(f)
            bwd.append(b)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    f, b = statistics.median(fwd), statistics.median(bwd)
    return dict(fwd_ms=f * 1e3, bwd_ms=b * 1e3, total_ms=(f + b) * 1e3, extra_mib=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--vocab", type=int, nargs="+", default=[151936, 37984])
    p.add_argument("--impls", nargs="+", default=["eager", "compile", "triton"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default="bench_gppo_kernel.json")
    p.add_argument("--free-gib", type=float, default=None, help="GPU memory a row may use (default: free now)")
    a = p.parse_args(argv)
    if a.device is None:
        print(
            "pending: no GPU here. Kernel speed is measured on GPUs only "
            "(use --device cpu --impls eager for a smoke run of this script)."
        )
        return 0
    if a.device == "cpu" and "triton" in a.impls:
        p.error("the Triton kernel runs on CPU only under the interpreter (correctness, not speed)")
    free = a.free_gib
    if free is None and a.device == "cuda":
        free = torch.cuda.mem_get_info()[0] / 2**30
    bw = copy_bandwidth(a.device)
    rows = []

    def write_json() -> None:
        Path(a.json).write_text(json.dumps(dict(device=a.device, copy_bandwidth_gbps=bw / 1e9, rows=rows), indent=2))

    for tokens in a.tokens:
        for vocab in a.vocab:
            for impl in a.impls:
                need = logprob_kernel_memory(tokens, vocab, impl).gib
                print(f"{impl} tokens={tokens} vocab={vocab}: needs ~{need:.1f} GiB", flush=True)
                row = dict(impl=impl, tokens=tokens, vocab=vocab, estimate_gib=need)
                if free is not None and need > free:
                    rows.append(dict(row, status="does not fit", free_gib=free))
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                try:
                    r = dict(row, status="ok", **bench_one(impl, tokens, vocab, a.device, a.iters))
                except torch.OutOfMemoryError as e:  # an estimate too low: a row, and the next one runs
                    rows.append(dict(row, status="out of memory", error=str(e).splitlines()[0][:300]))
                    print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:
                    # A failing kernel stops the benchmark with its traceback; the rows measured so
                    # far are kept in the JSON.
                    write_json()
                    raise RuntimeError(f"{impl} failed at tokens={tokens} vocab={vocab}: {type(e).__name__}") from e
                floor_s = 6 * tokens * vocab / bw
                r["floor_ms"] = floor_s * 1e3
                r["x_floor"] = r["total_ms"] / r["floor_ms"]
                r["achieved_gbps"] = 6 * tokens * vocab / (r["total_ms"] / 1e3) / 1e9
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(
        f"\ndevice: {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}), "
        f"copy bandwidth {bw / 1e9:.0f} GB/s"
    )
    print("| tokens | vocab | impl | fwd ms | bwd ms | total ms | floor ms | x floor | GB/s | extra MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['tokens']} | {r['vocab']} | {r['impl']} | {r['status']} (~{r['estimate_gib']:.0f} GiB) |")
            continue
        extra = "n/a" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
        print(
            f"| {r['tokens']} | {r['vocab']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
            f"{r['total_ms']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | {r['achieved_gbps']:.0f} | {extra} |"
        )
    write_json()
    return 0


if __name__ == "__main__":
    sys.exit(main())
