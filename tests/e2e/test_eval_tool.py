"""tools/eval.py as a user runs it: held-out prompts with every one of the k responses kept in
``--out``, free-text ``--prompt``s, and a bad model directory as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.jobs import ROOT

EVAL = [sys.executable, str(ROOT / "tools/eval.py")]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EVAL, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_out_keeps_all_k_responses_of_each_prompt(hf_models, tmp_path):
    out = tmp_path / "eval.jsonl"
    r = run_eval("--model", str(hf_models["gqa4_tied"]), "--data", str(ROOT / "examples/data/math_test.parquet"),
                 "--k", "3", "--max-prompts", "2", "--max-new-tokens", "8", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    per_prompt = [row for row in rows if "responses" in row]
    assert len(per_prompt) == 2
    for row in per_prompt:
        assert len(row["responses"]) == 3 and len(row["scores"]) == 3 and row["data_source"]


def test_free_text_prompts_print_k_responses_each(hf_models, tmp_path):
    out = tmp_path / "free.jsonl"
    r = run_eval("--model", str(hf_models["gqa4_tied"]), "--prompt", "What is 12 + 30?", "--prompt", "Hi",
                 "--k", "2", "--max-new-tokens", "6", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("=== prompt: 'What is 12 + 30?' | response") == 2
    assert r.stdout.count("=== prompt: 'Hi' | response") == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["What is 12 + 30?", "Hi"]
    assert all(len(row["responses"]) == 2 for row in rows)


def test_a_directory_without_a_model_is_one_line_exit_2(tmp_path):
    r = run_eval("--model", str(tmp_path), "--prompt", "Hi")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no config.json" in r.stderr
