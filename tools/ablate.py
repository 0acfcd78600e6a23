#!/usr/bin/env python
"""The paper's ablations at demo scale, several seeds each, from the demo's SFT model.

    python tools/ablate.py [--demo runs/demo] [--out runs/ablate] [--seeds 3] [--steps 30]
                           [--suites algos,filter,code_reward]

Suites (each arm is one RL run per seed of examples/demo/rl_math.yaml with overrides):
  algos        algo.loss = gppo | clip (clip-higher) | cispo        (paper Figure 2)
  filter       gppo with vs without zero-advantage filtering       (dynamic sampling)
  code_reward  code RL (examples/tiny/rl_code.yaml data) with soft vs binary test reward
               (paper Figure 5)
Writes OUT/ablation.json (every run's curves), OUT/<suite>.png (mean held-out avg@k per arm
with the min-max band across seeds) and OUT/summary.md (final mean and spread per arm).
Finished runs are reused: rerunning after an interruption continues where it stopped.
What wins at this scale is whatever is measured; nothing here is tuned toward a result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUITES: dict[str, dict[str, list[str]]] = {
    "algos": {"gppo": ["algo.loss=gppo"], "clip": ["algo.loss=clip"], "cispo": ["algo.loss=cispo"]},
    "filter": {"filtered": ["algo.filter_zero_adv=true"], "unfiltered": ["algo.filter_zero_adv=false"]},
    "code_reward": {"soft": ["reward.code.binary=false"], "binary": ["reward.code.binary=true"]},
}


def suite_overrides(suite: str, data: Path) -> list[str]:
    """What a suite changes in the demo RL config besides its arms."""
    if suite != "code_reward":
        return [f"data.train=[{data / 'math_train.parquet'}]", f"data.eval=[{data / 'math_test.parquet'}]"]
    return [
        f"data.train=[{data / 'code_train.parquet'}]",
        f"data.eval=[{data / 'code_test.parquet'}]",
        "data.min_code_tests=1",
        "optim.lr=5.0e-6",
        "optim.min_lr=5.0e-6",
    ]


def run_arm(out: Path, demo: Path, suite: str, arm: str, seed: int, steps: int) -> Path:
    from megatron_klear.experiments import run_stage

    run = out / suite / f"{arm}_seed{seed}"
    if not (run / "final_eval.json").is_file():
        overrides = [
            f"output_dir={run}",
            f"model.hf={demo / 'sft' / 'hf'}",
            f"seed={seed}",
            f"train_steps={steps}",
            "checkpoint.export_hf=false",
            *suite_overrides(suite, demo / "data"),
            *SUITES[suite][arm],
        ]
        print(f"==> {suite}/{arm} seed {seed}", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        run_stage("megatron_klear.rl", "examples/demo/rl_math.yaml", overrides, run.parent / f"{run.name}.log")
    return run


def plot_suite(path: Path, suite: str, curves: dict[str, list[list[tuple[int, float, float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in curves.items():
        steps = [p[0] for p in runs[0]]
        per_step = [[r[i][1] for r in runs if i < len(r)] for i in range(len(steps))]
        ax.plot(steps, [statistics.mean(v) for v in per_step], "o-", label=f"{arm} (n={len(runs)})")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out avg@4")
    ax.set_title(f"ablation: {suite} (mean, min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished tools/demo.sh --out directory")
    p.add_argument("--out", default=str(ROOT / "runs" / "ablate"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--suites", default="algos,filter,code_reward")
    a = p.parse_args(argv)

    from megatron_klear.experiments import eval_points

    demo, out = Path(a.demo).resolve(), Path(a.out).resolve()
    if not (demo / "sft" / "hf" / "config.json").is_file():
        print(f"error: {demo}/sft/hf is missing: run bash tools/demo.sh --out {demo} first", file=sys.stderr)
        return 2
    suites = [s for s in a.suites.split(",") if s]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        print(f"error: unknown suites {unknown}; choose from {sorted(SUITES)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    lines = [
        "| suite | arm | seeds | final held-out avg@4 mean | min | max | start |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for suite in suites:
        curves: dict[str, list] = {}
        for arm in SUITES[suite]:
            for seed in range(1, a.seeds + 1):
                run = run_arm(out, demo, suite, arm, seed, a.steps)
                curves.setdefault(arm, []).append(eval_points(run))
        results[suite] = curves
        plot_suite(out / f"{suite}.png", suite, curves)
        for arm, runs in curves.items():
            finals = [r[-1][1] for r in runs]
            lines.append(
                f"| {suite} | {arm} | {len(runs)} | {statistics.mean(finals):.3f} | {min(finals):.3f} | "
                f"{max(finals):.3f} | {runs[0][0][1]:.3f} |"
            )
    (out / "ablation.json").write_text(json.dumps({"steps": a.steps, "seeds": a.seeds, "curves": results}, indent=1))
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
