#!/usr/bin/env python
"""The real SGLang engine on CPU: weight-sync throughput, and one tiny RL step vs the HF engine.

    python tools/bench_sglang.py [--sync-only] [--json docs/bench_sglang_cpu.json]

Needs the SGLang venv that ``bash tools/test.sh`` installs (.venv-sglang, or
KLEAR_SGLANG_PYTHON). Part 1 starts one real CPU server (float32) and pushes the weights of a
random Qwen3 (``--hidden``/``--layers``) into it, ``--repeats`` times per mode: colocated
(``update_weights_from_tensor``, shared-memory CPU tensors) and distributed (gloo broadcast);
it reports bytes, seconds and GB/s of the full begin ... end update. Part 2 runs one step of
examples/tiny/rl_math.yaml on 2 ranks with each engine and reports generate s, sync s and
generated tokens/s from metrics.jsonl. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_klear.inference.base import SamplingParams  # noqa: E402
from megatron_klear.inference.sglang import SGLangEngine  # noqa: E402
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model  # noqa: E402
from tests.sglang_real import cli_overrides, cpu_engine_config  # noqa: E402


def bench_sync(work: Path, hidden: int, layers: int, repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    args = TinyModelArgs(layers=layers, hidden=hidden, heads=8, kv_heads=4, head_dim=hidden // 8, ffn=3 * hidden)
    model_dir = make_tiny_model(work / "model", args)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    named = [(n, p.detach().clone()) for n, p in hf.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    eng = SGLangEngine(cpu_engine_config(model_dir, work / "logs", replicas=1))
    rows = []
    try:
        for mode in ("colocated", "distributed"):
            eng.cfg.mode = mode  # the same server; only the update path differs
            for i in range(repeats):
                t0 = time.perf_counter()
                eng.update_weights([named], f"{mode}-{i}")
                dt = time.perf_counter() - t0
                rows.append({"mode": mode, "bytes": nbytes, "seconds": dt, "gb_per_s": nbytes / dt / 1e9})
        eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))  # the server still serves
    finally:
        eng.shutdown()
    return rows


def bench_rl_step(work: Path) -> list[dict]:
    from tests.jobs import torchrun  # the tests' launcher: OMP_NUM_THREADS=1, bounded wait

    base = make_tiny_model(work / "base", TinyModelArgs(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128))
    data = ROOT / "examples" / "data"
    common = [
        f"model.hf={base}", "bootstrap=null", "data.generate=null", f"data.train=[{data / 'math_train.parquet'}]",
        "data.eval=[]", "train_steps=1", "data.prompts_per_step=8", "data.mini_batch_prompts=4",
        "data.max_gen_batches=1", "rollout.n_samples=4", "rollout.max_response_len=64", "eval.at_start=false",
        "eval.at_end=false", "checkpoint.export_hf=false", "log.tensorboard=false", "rollout.check_consistency=false",
    ]  # fmt: skip
    rows = []
    for engine in ("hf", "sglang"):
        out = work / f"rl_{engine}"
        extra = [f"output_dir={out}", f"rollout.engine={engine}"]
        if engine == "sglang":
            extra += cli_overrides(cpu_engine_config(base, work / "unused", mode="colocated"))
        torchrun("megatron_klear.rl", "examples/tiny/rl_math.yaml", 2, common + extra, timeout=900)
        m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        tokens = m["response/length_mean"] * m["rollout/samples"]
        rows.append({"engine": engine, "generate_s": m["time/generate_s"], "sync_s": m["time/sync_s"],
                     "generated_tokens": tokens, "tokens_per_s": tokens / m["time/generate_s"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sync-only", action="store_true")
    p.add_argument("--json", default="bench_sglang_cpu.json")
    a = p.parse_args(argv)
    os.environ.setdefault("KLEAR_SGLANG_PYTHON", str(ROOT / ".venv-sglang" / "bin" / "python"))
    with tempfile.TemporaryDirectory() as tmp:
        sync = bench_sync(Path(tmp), a.hidden, a.layers, a.repeats)
        rl = [] if a.sync_only else bench_rl_step(Path(tmp))
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {cpu.split(':')[-1].strip()}",
              "python": platform.python_version(), "sync": sync, "rl_step": rl}  # fmt: skip
    print(f"{'mode':<12}{'MB':>10}{'s':>10}{'GB/s':>10}")
    for r in sync:
        print(f"{r['mode']:<12}{r['bytes'] / 1e6:>10.1f}{r['seconds']:>10.3f}{r['gb_per_s']:>10.3f}")
    for r in rl:
        print(f"RL step, {r['engine']}: generate {r['generate_s']:.2f} s, sync {r['sync_s']:.2f} s, "
              f"{r['tokens_per_s']:.1f} generated tokens/s")  # fmt: skip
    Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
