#!/usr/bin/env python
"""End-to-end demo on a 2-core CPU: data -> tiny Qwen3 -> long-CoT SFT -> math GPPO RL (HF
engine) -> held-out evaluation before and after RL -> HF export -> table and plot.

    bash tools/demo.sh [--out runs/demo] [--rl-steps 30] [--seed 1234]

Configs: examples/demo/sft.yaml and examples/demo/rl_math.yaml (paths rewritten under --out).
Writes OUT/summary.json, OUT/summary.md and OUT/demo.png (reward and accuracy per RL step);
the stages' TensorBoard logs are OUT/sft/tensorboard and OUT/rl/tensorboard
(``tensorboard --logdir OUT``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="working directory (reused if present)")
    p.add_argument("--rl-steps", type=int, default=None, help="override train_steps of the RL stage")
    p.add_argument("--seed", type=int, default=1234, help="RL seed (sampling, prompt order)")
    a = p.parse_args(argv)

    from experiments import eval_points, plot_run, read_metrics, run_stage, write_config_data

    out = Path(a.out).resolve()
    data, sft, rl = out / "data", out / "sft", out / "rl"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()

    print("==> data: two-digit addition with digit-by-digit reasoning", flush=True)
    if not (data / "sft.jsonl").is_file():
        write_config_data("examples/demo/sft.yaml", data)
    times["data_s"] = time.time() - t0

    t = time.time()
    print("==> long-CoT SFT of a tiny Qwen3 (2 processes)", flush=True)
    if not (sft / "hf" / "config.json").is_file():
        run_stage(
            "megatron_klear.sft",
            "examples/demo/sft.yaml",
            [
                f"output_dir={sft}",
                f"model.hf={out / 'model'}",
                f"data.generate={data}",
                f"data.train=[{data / 'sft.jsonl'}]",
                f"data.cache_dir={out / 'cache'}",
            ],
            out / "sft.log",
        )
    times["sft_s"] = time.time() - t

    t = time.time()
    print("==> math GPPO RL with the HF engine (eval before, during and after)", flush=True)
    overrides = [
        f"output_dir={rl}",
        f"model.hf={sft / 'hf'}",
        f"data.train=[{data / 'math_train.parquet'}]",
        f"data.eval=[{data / 'math_test.parquet'}]",
        f"seed={a.seed}",
    ]
    if a.rl_steps is not None:
        overrides.append(f"train_steps={a.rl_steps}")
    if not (rl / "final_eval.json").is_file():
        run_stage("megatron_klear.rl", "examples/demo/rl_math.yaml", overrides, out / "rl.log")
    times["rl_s"] = time.time() - t

    evals = eval_points(rl)
    before, after = evals[0], evals[-1]
    sft_rows = read_metrics(sft)
    summary = {
        "sft_steps": sft_rows[-1]["step"],
        "sft_final_loss": sft_rows[-1]["loss"],
        "rl_steps": after[0],
        "heldout_avg@4_before_rl": before[1],
        "heldout_avg@4_after_rl": after[1],
        "heldout_pass@4_before_rl": before[2],
        "heldout_pass@4_after_rl": after[2],
        "evals": evals,
        "exported_hf": str(rl / "hf"),
        **{k: round(v, 1) for k, v in times.items()},
        "total_s": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_run(rl, out / "demo.png", "demo: tiny Qwen3, two-digit addition, GPPO")
    table = [
        "| stage | held-out avg@4 | held-out pass@4 |",
        "|---|---:|---:|",
        f"| after SFT ({summary['sft_steps']} steps) | {before[1]:.3f} | {before[2]:.3f} |",
        f"| after GPPO RL ({after[0]} steps) | {after[1]:.3f} | {after[2]:.3f} |",
    ]
    md = "\n".join(table) + (
        f"\n\nTimes (s): data {times['data_s']:.0f}, SFT {times['sft_s']:.0f}, RL {times['rl_s']:.0f}, "
        f"total {summary['total_s']:.0f}. HF export: {rl / 'hf'}. Plot: {out / 'demo.png'}. "
        f"TensorBoard: tensorboard --logdir {out}.\n"
    )
    (out / "summary.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
