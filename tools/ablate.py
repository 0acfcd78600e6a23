#!/usr/bin/env python
"""The paper's ablations at demo scale, several seeds each.

    python tools/ablate.py [--demo runs/demo] [--out runs/ablate] [--seeds 3] [--steps N]
                           [--suites algos,offpolicy,filter,code_reward]

Suites (each arm is one RL run per seed; an arm that is a suite's base config is run once and
shared by the suites that compare against it):
  algos        math RL from the demo's SFT model (examples/demo/rl_math.yaml) with
               algo.loss = gppo | clip (clip-higher) | cispo                 (paper Figure 2)
  code_reward  code RL (examples/demo/rl_code.yaml) from a tiny Qwen3 SFT'd on our code
               problems (examples/demo/sft_code.yaml, made once under OUT/code) with the
               soft (pass fraction) vs binary (all tests pass) reward        (paper Figure 3)
  filter       math GPPO with vs without zero-advantage filtering            (paper Figure 5)
  offpolicy    the algos suite with 8 updates per rollout batch at lr 1e-4 for 20 steps, so
               that clipping engages (it never does in the demo's setting), plus GPPO with
               the engine's log-probs as old log-probs (algo.old_logprobs=engine) instead of
               the trainer's recomputation
Writes OUT/ablation.json (every run's held-out and training curves), OUT/<suite>.png (held-out
avg@k, training reward mean and training reward std per step for each arm: the mean over seeds
with the min-max band across seeds) and OUT/summary.md (step-0 and final held-out avg@k with
their spread across seeds; training reward mean and std, and the fraction of tokens the loss
clipped, averaged over all steps and seeds).
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
ALGO_ARMS = {"gppo": [], "clip": ["algo.loss=clip"], "cispo": ["algo.loss=cispo"]}
OFF_POLICY = ["data.mini_batch_prompts=1", "optim.lr=1e-4", "optim.min_lr=1e-4", "train_steps=20"]
# GPPO whose ratio is taken against the engine's sampling log-probs (what the engine actually
# sampled from) rather than the trainer's recomputation of them
OFF_POLICY_ARMS = {**ALGO_ARMS, "gppo_old_engine": ["algo.old_logprobs=engine"]}

# Each arm's overrides on top of the demo RL config; [] is the demo config itself (GPPO with
# zero-advantage filtering, soft code reward), so that run is shared by the suites that hold it.
SUITES: dict[str, dict[str, list[str]]] = {
    "algos": ALGO_ARMS,
    # The demo's 2 updates per rollout batch at lr 1e-5 never leave the clip range (clipfrac 0),
    # which makes the three losses the same update. Here 8 updates per batch at lr 1e-4 move the
    # policy far enough for ~1% of tokens to be clipped (measured), the regime where they differ.
    "offpolicy": {arm: [*OFF_POLICY, *extra] for arm, extra in OFF_POLICY_ARMS.items()},
    "filter": {"filtered": [], "unfiltered": ["algo.filter_zero_adv=false"]},
    "code_reward": {"soft": [], "binary": ["reward.code.binary=true"]},
}


def prepare_code_model(out: Path, demo: Path) -> Path:
    """The code suite's starting point: our code problems (held-out statements for eval) and a
    tiny Qwen3 SFT'd on them from the demo's random init (examples/demo/sft_code.yaml)."""
    from experiments import run_stage, write_config_data

    data, sft = out / "code" / "data", out / "code" / "sft"
    if not (data / "sft.jsonl").is_file():
        write_config_data("examples/demo/sft_code.yaml", data)
    if not (sft / "hf" / "config.json").is_file():
        print("==> code SFT for the code_reward suite", flush=True)
        overrides = [
            f"output_dir={sft}",
            f"model.hf={demo / 'model'}",
            f"data.generate={data}",
            f"data.train=[{data / 'sft.jsonl'}]",
            f"data.cache_dir={out / 'code' / 'cache'}",
        ]
        run_stage("megatron_klear.sft", "examples/demo/sft_code.yaml", overrides, out / "code" / "sft.log")
    return out / "code"


def stage_overrides(suite: str, out: Path, demo: Path) -> tuple[str, list[str]]:
    """(RL config, its path overrides) of a suite: math from the demo's SFT model, or code from
    the code suite's own SFT model."""
    if suite != "code_reward":
        data = demo / "data"
        return "examples/demo/rl_math.yaml", [
            f"model.hf={demo / 'sft' / 'hf'}",
            f"data.train=[{data / 'math_train.parquet'}]",
            f"data.eval=[{data / 'math_test.parquet'}]",
        ]
    code = prepare_code_model(out, demo)
    return "examples/demo/rl_code.yaml", [
        f"model.hf={code / 'sft' / 'hf'}",
        f"data.train=[{code / 'data' / 'code_train.parquet'}]",
        f"data.eval=[{code / 'data' / 'code_test.parquet'}]",
    ]


def run_arm(out: Path, demo: Path, suite: str, arm: str, seed: int, steps: int | None) -> Path:
    from experiments import run_stage

    task = "code" if suite == "code_reward" else "math"
    arm_key = "-".join(o.replace("=", "_") for o in SUITES[suite][arm]) or "base"
    # one run per distinct config, whichever suite asks; --steps N runs apart from the configs' lengths
    run = out / "runs" / f"{task}_{arm_key}{f'_steps{steps}' if steps else ''}_seed{seed}"
    if not (run / "final_eval.json").is_file():
        config, paths = stage_overrides(suite, out, demo)
        overrides = [
            f"output_dir={run}",
            f"seed={seed}",
            "checkpoint.export_hf=false",
            *paths,
            *SUITES[suite][arm],
            *([f"train_steps={steps}"] if steps else []),  # last: it overrides the offpolicy arms' 20 too
        ]
        print(f"==> {suite}/{arm} seed {seed}", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        run_stage("megatron_klear.rl", config, overrides, run.parent / f"{run.name}.log")
    return run


def train_points(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, training reward mean, training reward std, fraction of tokens clipped) for every
    RL step of a run (steps that made no update count as 0 clipped)."""
    from experiments import read_metrics

    return [
        (
            r["step"],
            r["reward/mean"],
            r["reward/std"],
            r.get("loss/clipfrac_high", 0.0) + r.get("loss/clipfrac_low", 0.0),
        )
        for r in read_metrics(run)
        if "reward/mean" in r
    ]


def _mean_band(ax, runs: list[list[tuple]], col: int, label: str) -> None:
    """Plot the mean over seeds of column `col` with the min-max band across seeds."""
    steps = [p[0] for p in runs[0]]
    per_step = [[r[i][col] for r in runs if i < len(r)] for i in range(len(steps))]
    ax.plot(steps, [statistics.mean(v) for v in per_step], "-", label=label)
    ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)


def plot_suite(path: Path, suite: str, evals: dict[str, list], trains: dict[str, list]) -> None:
    """Held-out avg@4 (left), training reward mean (middle) and its within-batch std (right) per
    arm: the mean over seeds with the min-max band across seeds, like the paper's Figures 2, 3, 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in evals:
        n = len(evals[arm])
        _mean_band(axes[0], evals[arm], 1, f"{arm} (n={n})")
        _mean_band(axes[1], trains[arm], 1, arm)
        _mean_band(axes[2], trains[arm], 2, arm)
    for ax, ylabel in zip(axes, ["held-out avg@4", "training reward mean", "training reward std"]):
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"ablation: {suite} (mean over seeds, band = min-max across seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished tools/demo.sh --out directory")
    p.add_argument("--out", default=str(ROOT / "runs" / "ablate"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (default: the config's, 30 math / 20 code)"
    )
    p.add_argument("--suites", default=",".join(SUITES), help="comma-separated; default: all")
    a = p.parse_args(argv)

    from experiments import eval_points

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
        "| suite | arm | seeds | held-out avg@4 at step 0 (mean) | final avg@4 mean | final min | final max "
        "| training reward mean | training reward std | tokens clipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for suite in suites:
        evals: dict[str, list] = {}
        trains: dict[str, list] = {}
        for arm in SUITES[suite]:
            for seed in range(1, a.seeds + 1):
                run = run_arm(out, demo, suite, arm, seed, a.steps)
                evals.setdefault(arm, []).append(eval_points(run))
                trains.setdefault(arm, []).append(train_points(run))
        results[suite] = {"eval": evals, "train": trains}
        plot_suite(out / f"{suite}.png", suite, evals, trains)
        for arm, runs in evals.items():
            finals = [r[-1][1] for r in runs]
            train_mean = statistics.mean(p[1] for r in trains[arm] for p in r)
            train_std = statistics.mean(p[2] for r in trains[arm] for p in r)
            clipped = statistics.mean(p[3] for r in trains[arm] for p in r)
            lines.append(
                f"| {suite} | {arm} | {len(runs)} | {statistics.mean(p[0][1] for p in runs):.3f} | "
                f"{statistics.mean(finals):.3f} | {min(finals):.3f} | {max(finals):.3f} | "
                f"{train_mean:.3f} | {train_std:.3f} | {clipped:.2%} |"
            )
    (out / "ablation.json").write_text(
        json.dumps({"steps": a.steps or "config", "seeds": a.seeds, "suites": results}, indent=1)
    )
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
