#!/usr/bin/env python
"""SFT throughput of a Qwen3-MoE shape at several expert-parallel sizes, same world size.

    python tools/bench_moe.py [--shape tiny-moe] [--nproc 2] [--eps 1,2] [--repeats 3]
        [--seq-len 512] [--steps 6] [--json docs/bench_moe_sft_cpu_tiny.json]

Each (EP, repeat) is one ``torchrun --nproc-per-node NPROC tools/bench_throughput.py --mode sft
--shape SHAPE --ep EP`` in fresh processes (random weights, the all-to-all token dispatcher);
the table shows the median and the fastest of the repeats' warm step times (on a shared machine
the fastest is the least disturbed) and the tokens/s per device of each; the JSON keeps every
repeat's result and the machine's load average. At EP=1 every rank holds all experts
and data parallel is the whole world; at EP=N each rank holds 1/N of them and tokens cross ranks
twice per MoE layer (dispatch and combine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(a, ep: int, out: Path) -> dict:
    """One bench_throughput run at expert parallel ``ep``; its JSON result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc)]
    cmd += [str(ROOT / "tools" / "bench_throughput.py"), "--mode", "sft", "--shape", a.shape, "--ep", str(ep)]
    cmd += ["--seq-len", str(a.seq_len), "--steps", str(a.steps), "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: ep={ep}: bench_throughput failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny-moe", help="a MoE shape of models.shapes (tiny-moe, 30b-a3b)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) of every run")
    p.add_argument("--eps", default="1,2", help="expert-parallel sizes to compare")
    p.add_argument("--repeats", type=int, default=3, help="runs per size (the median is shown)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    p.add_argument("--json", default="bench_moe.json")
    a = p.parse_args(argv)
    eps = [int(x) for x in a.eps.split(",")]
    if any(a.nproc % ep for ep in eps):
        p.error(f"every --eps size must divide --nproc={a.nproc}, got {eps}")
    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # interleaved: drifting machine load hits every size alike
            for ep in eps:
                runs.setdefault(ep, []).append(run_once(a, ep, Path(tmp) / f"ep{ep}_{r}.json"))
    rows = []
    for ep in eps:
        times = [x["step_s"] for x in runs[ep]]
        first = runs[ep][0]
        tokens = first["tokens_per_s_per_device"] * first["step_s"]  # tokens per device per step
        median, best = statistics.median(times), min(times)
        rows.append(
            dict(
                ep=ep,
                dp=first["dp"],
                step_s_median=median,
                step_s_min=best,
                tokens_per_s_per_device_median=tokens / median,
                tokens_per_s_per_device_best=tokens / best,
            )
        )
    base = rows[0]["tokens_per_s_per_device_median"], rows[0]["tokens_per_s_per_device_best"]
    first = runs[eps[0]][0]
    print(
        f"{a.shape}: {first['params'] / 1e6:.2f}M params ({first['active_params'] / 1e6:.2f}M active), "
        f"{a.nproc} ranks on {first['device']}, {first['dtype']}, seq {a.seq_len} x {first['micro_batches']} "
        f"micro-batches per rank, {a.repeats} runs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"| EP | DP | step s median / fastest | tokens/s/device median / best | vs EP={eps[0]} median / best |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        med, best = row["tokens_per_s_per_device_median"], row["tokens_per_s_per_device_best"]
        print(
            f"| {row['ep']} | {row['dp']} | {row['step_s_median']:.3f} / {row['step_s_min']:.3f} | "
            f"{med:.0f} / {best:.0f} | {med / base[0]:.2f} / {best / base[1]:.2f} |"
        )
    result = dict(
        date=datetime.date.today().isoformat(),
        machine=f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        load_average=os.getloadavg(),
        shape=a.shape,
        nproc=a.nproc,
        seq_len=a.seq_len,
        steps=a.steps,
        repeats=a.repeats,
        rows=rows,
        runs={str(k): v for k, v in runs.items()},
    )
    Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
