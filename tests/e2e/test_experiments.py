"""tools/ablate.py's bookkeeping: finished runs are reused (not rerun), one run serves every suite
that holds its config, and the summary's means and spreads are those of the runs' curves.

The run directories here are written by the test in the formats the RL trainer writes
(metrics.jsonl rows, eval.jsonl summary rows, final_eval.json); the RL runs themselves are
exercised in tests/test_rl.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import ablate  # noqa: E402


def write_run(run: Path, evals: list[tuple[int, float]], rewards: list[tuple[float, float]]) -> None:
    run.mkdir(parents=True)
    rows = [
        {"step": i + 1, "reward/mean": m, "reward/std": s, "loss/clipfrac_high": 0.01, "loss/clipfrac_low": 0.02}
        for i, (m, s) in enumerate(rewards)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    for step, avg in evals:
        lines.append({"step": step, "uid": "q0", "correct": [True]})  # a per-prompt row: ignored
        lines.append({"step": step, "summary": {"eval/avg@4": avg, "eval/pass@4": min(1.0, 2 * avg)}})
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "final_eval.json").write_text("{}")


def test_summary_reuses_finished_runs_and_reports_mean_and_spread(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "out"
    (demo / "sft" / "hf").mkdir(parents=True)
    (demo / "sft" / "hf" / "config.json").write_text("{}")
    runs = out / "runs"
    write_run(runs / "math_base_seed1", [(0, 0.40), (2, 0.50)], [(0.2, 0.4), (0.4, 0.5)])
    write_run(runs / "math_base_seed2", [(0, 0.44), (2, 0.60)], [(0.3, 0.4), (0.5, 0.5)])
    write_run(runs / "math_algo.filter_zero_adv_false_seed1", [(0, 0.42), (2, 0.45)], [(0.1, 0.3), (0.1, 0.3)])
    write_run(runs / "math_algo.filter_zero_adv_false_seed2", [(0, 0.40), (2, 0.47)], [(0.1, 0.3), (0.3, 0.3)])

    assert ablate.main(["--demo", str(demo), "--out", str(out), "--seeds", "2", "--suites", "filter"]) == 0
    summary = (out / "summary.md").read_text().splitlines()
    assert "| filter | filtered | 2 | 0.420 | 0.550 | 0.500 | 0.600 | 0.350 | 0.450 | 3.00% |" in summary
    assert "| filter | unfiltered | 2 | 0.410 | 0.460 | 0.450 | 0.470 | 0.150 | 0.300 | 3.00% |" in summary
    data = json.loads((out / "ablation.json").read_text())
    assert data["suites"]["filter"]["eval"]["filtered"][1] == [[0, 0.44, 0.88], [2, 0.6, 1.0]]
    assert (out / "filter.png").stat().st_size > 0
    assert sorted(p.name for p in runs.iterdir()) == sorted(  # nothing was rerun or added
        [
            "math_base_seed1",
            "math_base_seed2",
            "math_algo.filter_zero_adv_false_seed1",
            "math_algo.filter_zero_adv_false_seed2",
        ]
    )
