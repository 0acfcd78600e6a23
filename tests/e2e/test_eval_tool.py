"""tools/eval.py as a user runs it: held-out prompts with every one of the k responses kept in
``--out``, free-text ``--prompt``s, a bad model directory as one line with exit 2, a benchmark
scored from responses made elsewhere, a benchmark run whose budget follows the context (with
YaRN from a config file), and the 64K example config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_klear.config import from_dict
from megatron_klear.inference.sglang_servers import SGLangConfig
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from tests import eval_fixtures as fx
from tests.jobs import ROOT

EVAL = [sys.executable, str(ROOT / "tools/eval.py")]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    """The tool as a user runs it, with progress lines every 0.2 s: they must stay on stderr."""
    env = dict(os.environ, MEGATRON_KLEAR_PROGRESS_S="0.2")
    return subprocess.run([*EVAL, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


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


def report_of(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_responses_from_elsewhere_are_scored_without_a_model(tmp_path):
    """LiveCodeBench rows as released (JSON and compressed private tests, a functional problem,
    rows outside the windows) and responses made elsewhere: the report by hand, the --out file
    scored again as --responses, and a v5 run picking its problem from the same files."""
    data = fx.livecodebench_jsonl(tmp_path / "test6.jsonl")
    theirs = fx.write_jsonl(tmp_path / "theirs.jsonl", [
        {"id": "abc400_a", "responses": [fx.fenced(fx.ADD_OK), fx.fenced(fx.ADD_WRONG_ON_PRIVATE)]},
        {"id": "3000", "responses": [fx.fenced(fx.TWO_SUM_OK), "no code at all"]},
        {"id": "abc360_a", "responses": ["x", "y"]},
        {"id": "abc410_a", "responses": [fx.fenced(fx.ADD_OK), fx.fenced(fx.ADD_OK)]},
    ])  # fmt: skip
    out = tmp_path / "ours.jsonl"
    rep = report_of(run_eval("--benchmark", "livecodebench", "--data", str(data), "--responses", str(theirs),
                             "--out", str(out)))  # fmt: skip
    assert (rep["problems"], rep["samples"], rep["avg@2"], rep["pass@2"]) == (4, 8, 0.5, 0.75)
    assert rep["by_difficulty"]["easy"] == {"problems": 2, "avg@2": 0.75, "pass@2": 1.0}
    assert rep["by_difficulty"]["hard"] == {"problems": 1, "avg@2": 0.0, "pass@2": 0.0}
    assert rep["protocol"]["temperature"] == 0.6 and rep["sandbox_failures"] == 0
    again = report_of(run_eval("--benchmark", "livecodebench", "--data", str(data), "--responses", str(out)))
    keys = ("avg@2", "pass@2", "by_difficulty")
    assert {k: again[k] for k in keys} == {k: rep[k] for k in keys}
    v5 = report_of(run_eval("--benchmark", "lcb_v5", "--data", str(data), "--responses", str(theirs)))
    assert (v5["problems"], v5["avg@2"], v5["protocol"]["responses_of_other_problems"]) == (1, 0.5, 3)
    bad = run_eval("--benchmark", "lcb_v5", "--data", str(data), "--responses", str(theirs), "--k", "8")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: k=8 but")


def test_a_benchmark_run_follows_the_context_and_takes_yarn(tmp_path):
    """An AIME 2025 file with the HF engine on a model of 48 positions: the default budget is
    the context minus the longest prompt; YaRN from a --config file doubles the context; a
    budget past the context is refused."""
    model = make_tiny_model(tmp_path / "m", TinyModelArgs(max_positions=48, seed=3))
    data = fx.aime25_jsonl(tmp_path / "aime25.jsonl")
    args = ["--benchmark", "aime25", "--data", str(data), "--model", str(model), "--k", "2"]
    rep = report_of(run_eval(*args, "--out", str(tmp_path / "o.jsonl")))
    longest = 48 - rep["protocol"]["max_new_tokens"]
    assert rep["protocol"]["context_length"] == 48 and 5 < longest < 48
    assert rep["samples"] == 4 and set(rep["strict"]) == {"avg@2", "pass@2"} and rep["protocol"]["top_p"] == 0.95
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["0", "1", None] and len(rows[0]["strict_correct"]) == 2
    # responses are logged as they come: a run killed after the first problem resumes there
    log = tmp_path / "o.responses.jsonl"
    head, first, _ = log.read_text().splitlines()
    log.write_text(f'{head}\n{first}\n{{"id": "1", "resp')  # the second row cut short by the kill
    again = run_eval(*args, "--out", str(tmp_path / "o.jsonl"))
    assert "1 problems already answered" in again.stderr and report_of(again)["samples"] == 4
    assert len(log.read_text().splitlines()) == 3
    other = run_eval(*args, "--out", str(tmp_path / "o.jsonl"), "--temperature", "1.0")
    assert other.returncode == 2 and "move it away to start over" in other.stderr
    cfg = tmp_path / "long.yaml"
    cfg.write_text("rope_scaling: {rope_type: yarn, factor: 2.0, original_max_position_embeddings: 48}\n")
    rep = report_of(run_eval("--config", str(cfg), *args))
    assert rep["protocol"]["context_length"] == 96 and rep["protocol"]["max_new_tokens"] == 96 - longest
    assert rep["protocol"]["rope_scaling"]["factor"] == 2.0
    bad = run_eval(*args, "--max-new-tokens", "60")
    assert bad.returncode == 2 and "exceeds the context of 48" in bad.stderr


def test_the_64k_example_config_loads():
    sys.path.insert(0, str(ROOT / "tools"))
    import eval as tool

    example = str(ROOT / "examples/qwen3_8b/eval_64k.yaml")
    args = ["--config", example, "--model", "/m", "--benchmark", "lcb_v6", "--data", "x.jsonl"]
    cfg = tool.load_eval_config(tool.parse_args(args))
    assert (cfg.context_length, cfg.max_new_tokens, cfg.engine) == (81920, 65536, "sglang")
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32768}
    assert cfg.protocol().k == 8 and cfg.sglang["replicas"] == 8
    # distributed servers on GPUs 0-7 of the node: an evaluation has no trainer to keep apart from
    assert from_dict(SGLangConfig, cfg.sglang, "sglang").device == "cuda"
