"""Small-scale experiment plumbing shared by tools/demo.py and tools/ablate.py: run a training
stage on local processes, read its metrics, plot reward and held-out accuracy per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_klear.config import from_dict
from megatron_klear.data.synthetic import SyntheticDataConfig, write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def run_stage(module: str, config: str, overrides: list[str], log: Path, nproc: int = 2) -> None:
    """torchrun on ``nproc`` local processes; the output goes to ``log`` (its tail is shown on failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", module, "--config", str(ROOT / config), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{module} failed (exit {rc}); log {log}:\n{tail}")


def write_config_data(config: str, out: Path) -> None:
    """Write into ``out`` the synthetic data set that ``config``'s ``data.synthetic`` section
    describes (what the config's ``data.generate`` would write)."""
    raw = yaml.safe_load((ROOT / config).read_text())
    write_synthetic(out, from_dict(SyntheticDataConfig, raw["data"]["synthetic"], "data.synthetic"))


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_points(run: Path) -> list[tuple[int, float, float]]:
    """(step, avg@k, pass@k) of every held-out evaluation of an RL run, from the summary rows
    of its ``eval.jsonl`` (step 0 is the evaluation before the first update)."""
    out = []
    for line in (run / "eval.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "summary" in row:
            summary = row["summary"]
            avg = next(v for k, v in summary.items() if k.startswith("eval/avg@"))
            pas = next(v for k, v in summary.items() if k.startswith("eval/pass@"))
            out.append((int(row["step"]), float(avg), float(pas)))
    return out


def plot_run(run: Path, path: Path, title: str) -> None:
    """Train reward and held-out avg@k / pass@k against the RL step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    steps = [r["step"] for r in rows if "reward/mean" in r]
    reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
    evals = eval_points(run)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, alpha=0.5, label="train reward (T=1.0, all generated groups)")
    ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="held-out avg@4 (T=0.6)")
    ax.plot([e[0] for e in evals], [e[2] for e in evals], "s--", label="held-out pass@4")
    ax.set_xlabel("RL step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
