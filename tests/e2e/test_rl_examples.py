"""The shipped RL configs as a user runs them, from the tiny SFT (the demo's task): the tiny
math RL example keeps groups and trains tokens on every step, the demo's RL config gives
identical metrics when run twice on one machine, and tools/eval.py's docstring example scores
the tiny SFT model on its held-out prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import ROOT, torchrun


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    """examples/tiny/sft.yaml as shipped (it creates the tiny model and the demo's data), with
    its output under a temporary folder; returns that folder."""
    root = tmp_path_factory.mktemp("tiny")
    torchrun(
        "megatron_klear.sft",
        "examples/tiny/sft.yaml",
        2,
        [f"output_dir={root / 'sft'}", f"model.hf={root / 'model'}", f"data.generate={root / 'data'}",
         f"data.train=[{root / 'data' / 'sft.jsonl'}]", f"data.cache_dir={root / 'cache'}", "log.tensorboard=false"],
        timeout=600,
    )  # fmt: skip
    return root


def rl_paths(root: Path, out: Path) -> list[str]:
    data = root / "data"
    return [
        f"output_dir={out}",
        f"model.hf={root / 'sft' / 'hf'}",
        "bootstrap=null",
        f"data.generate={data}",
        f"data.train=[{data / 'math_train.parquet'}]",
        f"data.eval=[{data / 'math_test.parquet'}]",
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_rl_math_example_keeps_groups_and_trains(tiny_sft, tmp_path):
    out = tmp_path / "rl"
    torchrun("megatron_klear.rl", "examples/tiny/rl_math.yaml", 2, rl_paths(tiny_sft, out) + ["train_steps=2",
             "eval.at_start=false", "eval.at_end=false", "checkpoint.export_hf=false"])  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/groups_kept"] >= 1 and r["train/updates"] >= 1 and r["train/tokens"] > 0, r
        assert 0 < r["reward/mean"] < 1  # some sums right, some wrong


def test_demo_rl_config_is_deterministic(tiny_sft, tmp_path):
    """Two runs of examples/demo/rl_math.yaml from the same model on one machine give the same
    numbers: every metric but timings, and the held-out evaluation."""
    short = ["train_steps=2", "eval.interval=0", "eval.max_prompts=8", "checkpoint.export_hf=false"]
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        torchrun("megatron_klear.rl", "examples/demo/rl_math.yaml", 2, rl_paths(tiny_sft, out) + short)
    a, b = (metrics(out) for out in outs)
    assert [untimed(r) for r in a] == [untimed(r) for r in b]
    assert [r["step"] for r in a] == [0, 1, 2]  # step 0: the evaluation before the first update
    assert sum(r["train/tokens"] for r in a[1:]) > 0  # the runs trained, so equality says something
    ea, eb = (json.loads((out / "final_eval.json").read_text()) for out in outs)
    assert untimed(ea) == untimed(eb) and "eval/avg@4" in ea


def untimed(row: dict) -> dict:
    """A metrics row without its wall-clock numbers (the timestamp, durations, throughput)."""
    return {k: v for k, v in row.items() if k != "time" and not k.startswith(("time/", "perf/"))}


def test_eval_docstring_example_scores_the_tiny_model(tiny_sft):
    """``python tools/eval.py --model runs/tiny_sft/hf --data runs/tiny_data/math_test.parquet
    --k 4 --max-prompts 32`` (paths under the fixture's folder), with the default budget: the
    model's context minus the longest prompt, so no answer is cut short."""
    cmd = [sys.executable, "tools/eval.py", "--model", str(tiny_sft / "sft" / "hf"), "--data",
           str(tiny_sft / "data" / "math_test.parquet"), "--k", "4", "--max-prompts", "32"]  # fmt: skip
    env = dict(os.environ, MEGATRON_KLEAR_PROGRESS_S="0.5")  # progress lines: on stderr, never in the JSON
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["eval/prompts"] == 32 and res["eval/avg@4"] > 0 and res["eval/math/lenient_avg@4"] > 0, res
