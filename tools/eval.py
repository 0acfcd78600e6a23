"""Evaluate a model: the paper's benchmarks from their public files, or our RL prompt sets.

Benchmarks (``--benchmark``, megatron_klear/evals): ``aime24``, ``aime25``, ``hmmt25`` (avg@64)
and ``lcb_v5``, ``lcb_v6``, ``livecodebench`` (avg@8), each run with its protocol (k, temperature
0.6, top_p 0.95, up to 32,768 new tokens, capped by the context) unless a flag says otherwise,
and reported as avg@k and pass@k (math also ``strict``: our training reward's rule; LiveCodeBench
also per difficulty). A code problem counts only when all its tests pass, in the training
sandbox. ``--responses FILE`` scores responses generated elsewhere (no model needed):

    python tools/eval.py --benchmark aime24 --data aime_2024.parquet --model /models/klear-8b \\
        --engine sglang --sglang replicas=8 --out runs/eval/aime24.jsonl
    python tools/eval.py --config examples/qwen3_8b/eval_64k.yaml --benchmark lcb_v6 \\
        --data test5.jsonl test6.jsonl --model /models/klear-8b        # 64K with YaRN 2.5
    python tools/eval.py --benchmark aime25 --data aime2025.jsonl --responses theirs.jsonl

Without ``--benchmark`` the prompt files are in our RL schema, scored by the training reward code
(strict) and, for math, like the public judge_math.py (lenient). The tiny SFT example trains
``runs/tiny_sft/hf`` on the demo's two-digit additions and writes held-out ones beside them
(one run here: avg@4 0.09, pass@4 0.25, tests/e2e/test_rl_examples.py; the tiny RL example's
``runs/tiny_rl_math/hf`` is evaluated the same way):

    torchrun --nproc-per-node 2 -m megatron_klear.sft --config examples/tiny/sft.yaml
    python tools/eval.py --model runs/tiny_sft/hf --data runs/tiny_data/math_test.parquet \\
        --k 4 --max-prompts 32 --out runs/eval/tiny_sft.jsonl
    python tools/eval.py --model runs/tiny_sft/hf --prompt "What is 12 + 30?" --k 2

Positions: ``--rope-scaling JSON`` applies YaRN over the model's config (both engines; e.g.
``{"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32768}``) and
``--context-length N`` sets the engine's context (default: what the model reaches). The default
``--max-new-tokens`` is the protocol's budget capped by that context minus the longest prompt.

``--config FILE`` reads every option from YAML (the keys are the flags' names with
underscores; relative paths against the file's folder); flags given on the command line win.
``--out`` keeps every response with its verdicts (a benchmark's ``--out`` is a valid
``--responses`` file) and the summary; generated responses are logged to
``<out>.responses.jsonl`` as they come, and the same command resumes there after an
interruption. Progress goes to stderr, the result (the report as JSON) to stdout.
``--engine hf`` (default) runs transformers in process; ``--engine sglang`` launches SGLang
servers (``--sglang key=value`` sets SGLangConfig fields).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_klear.cli import OneLineParser
from megatron_klear.config import from_dict, load_config
from megatron_klear.console import heartbeat
from megatron_klear.data.chat import decode_response, render_prompt, stop_token_ids
from megatron_klear.data.rl import CurationConfig, load_rl_prompts
from megatron_klear.errors import ConfigError, KlearError
from megatron_klear.evals.benchmarks import BENCHMARKS, Protocol, load_problems
from megatron_klear.evals.config import RL_SCHEMA, EvalToolConfig
from megatron_klear.evals.scoring import EVAL_CODE, read_responses, score_problems, summarize, write_results
from megatron_klear.inference.hf import HFEngine
from megatron_klear.inference.sglang import SGLangEngine
from megatron_klear.inference.sglang_servers import SGLangConfig
from megatron_klear.models.config import read_config_dict, served_config
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.rl.config import RewardConfig
from megatron_klear.rl.evaluate import eval_sampling, evaluate

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file of these options (flags given here win)")
    p.add_argument("--model", help="HF model directory (weights + tokenizer)")
    p.add_argument("--benchmark", help=f"one of {', '.join(BENCHMARKS)}; default: prompt files in our RL schema")
    p.add_argument("--data", nargs="+", help="the benchmark's rows (.jsonl / .json / .parquet)")
    p.add_argument("--responses", help='JSONL of {"id": ..., "responses": [k strings]} to score (no model)')
    p.add_argument("--prompt", action="append", help="a free-text user prompt (repeatable): print k responses")
    for name, kind in (("k", int), ("temperature", float), ("top-p", float), ("top-k", int),
                       ("max-new-tokens", int), ("context-length", int), ("max-prompts", int), ("seed", int),
                       ("reward-workers", int), ("math-wrong-score", float)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--rope-scaling", type=json.loads, help="YaRN over the model's config, as JSON")
    for name in ("question-key", "answer-key", "id-key", "instruction", "start-date", "end-date", "device", "dtype"):
        p.add_argument(f"--{name}")
    p.add_argument("--engine", choices=["hf", "sglang"])
    p.add_argument("--sglang", nargs="*", help="SGLangConfig fields as key=value")
    p.add_argument("--code", nargs="*", help="CodeRewardConfig fields as key=value (e.g. timeout_s=10)")
    p.add_argument("--out", help="JSONL of every problem's responses and verdicts, then the summary")
    return p.parse_args(argv)


def load_eval_config(a: argparse.Namespace) -> EvalToolConfig:
    """The YAML of ``--config`` (paths against its folder), then the flags given (paths against
    the working directory), checked."""
    overrides = []
    for key, value in vars(a).items():
        if key in ("sglang", "code"):  # key=value items update the YAML's mapping
            overrides += [f"{key}.{item}" for item in value]
        elif key not in ("config", "prompt"):
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the value comes back as given
    cfg = load_config(EvalToolConfig, getattr(a, "config", None), overrides)
    if cfg.model is None and cfg.responses is None:
        raise ConfigError("--model is required (or --responses with --benchmark)")
    if not cfg.data and not getattr(a, "prompt", None):
        raise ConfigError("--data is required (or --prompt)")
    return cfg


def engine_context(cfg: EvalToolConfig) -> int:
    """The context the engine runs the model at (checks --rope-scaling / --context-length)."""
    return served_config(read_config_dict(cfg.model), cfg.rope_scaling, cfg.context_length, where="eval")[1]


def sglang_config(cfg: EvalToolConfig) -> SGLangConfig:
    """``--sglang`` fields with the model and the positions filled in."""
    logs = f"{Path(cfg.out).with_suffix('')}.sglang_logs" if cfg.out else "sglang_logs"
    values = {"log_dir": logs, **cfg.sglang, "model_path": cfg.model, "rope_scaling": cfg.rope_scaling,
              "context_length": cfg.context_length}  # fmt: skip
    sg = from_dict(SGLangConfig, values, "sglang")
    sg.check_launchable("sglang")
    return sg


def build_engine(cfg: EvalToolConfig):
    if cfg.engine == "hf":
        return HFEngine(cfg.model, device=cfg.device, dtype=cfg.dtype, rope_scaling=cfg.rope_scaling)
    return SGLangEngine(sglang_config(cfg))


def token_budget(cfg: EvalToolConfig, protocol: Protocol, context: int, longest_prompt: int) -> int:
    """New tokens per response: ``max_new_tokens`` when given (refused past the context), else
    the protocol's budget capped by the room the context leaves after the longest prompt (our RL
    sets: all of that room)."""
    room = context - longest_prompt
    if room < 1:
        raise ConfigError(f"the longest prompt has {longest_prompt} tokens: the context of {context} leaves no room")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens > room:
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} + the longest prompt ({longest_prompt} tokens) exceeds the "
            f"context of {context}: raise context_length (past the model's positions with rope_scaling: YaRN)"
        )
    return min(protocol.max_new_tokens, room) if protocol.max_new_tokens else room


def sample_prompts(cfg: EvalToolConfig, texts: list[str], tok) -> list[dict]:
    """``--prompt``: k responses to each free-text prompt (also written to ``--out``)."""
    ids = [render_prompt(tok, [{"role": "user", "content": text}]) for text in texts]
    protocol = cfg.protocol()
    budget = token_budget(cfg, protocol, engine_context(cfg), max(map(len, ids)))
    params = eval_sampling(tok, protocol.k, protocol.temperature, protocol.top_p, budget, cfg.seed,
                           stop_token_ids(tok, cfg.model))  # fmt: skip
    engine = build_engine(cfg)
    try:
        groups = engine.generate(ids, dataclasses.replace(params, top_k=cfg.top_k))
    finally:
        engine.shutdown()
    rows = [{"prompt": text, "responses": [decode_response(tok, c.output_ids) for c in group]}
            for text, group in zip(texts, groups)]  # fmt: skip
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def evaluate_rl_schema(cfg: EvalToolConfig, tok) -> dict:
    """Our RL prompt files, scored by the training reward (``rl.evaluate``)."""
    prompts, _ = load_rl_prompts(cfg.data, CurationConfig(min_code_tests=0, dedup=False))
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    protocol = cfg.protocol()
    longest = max(len(render_prompt(tok, p.messages)) for p in prompts)
    budget = token_budget(cfg, protocol, engine_context(cfg), longest)
    rewards = RewardConfig(MathRewardConfig(wrong_score=cfg.math_wrong_score), CodeRewardConfig(**cfg.code))
    engine = build_engine(cfg)
    try:
        return evaluate(engine, tok, prompts, rewards, workers=cfg.reward_workers, k=protocol.k,
                        temperature=protocol.temperature, top_p=protocol.top_p, max_new_tokens=budget,
                        seed=cfg.seed, stop_ids=stop_token_ids(tok, cfg.model),
                        out_jsonl=Path(cfg.out) if cfg.out else None)  # fmt: skip
    finally:
        engine.shutdown()


class ResponseLog:
    """``<out>.responses.jsonl``: each problem's responses as soon as its group is generated, so
    an interrupted run resumes where it stopped. Its first row holds the sampling settings; a
    run with others refuses to mix them in. Without ``--out``: nothing is written."""

    def __init__(self, out: Optional[str], settings: dict):
        self.path = Path(f"{Path(out).with_suffix('')}.responses.jsonl") if out else None
        self.done: dict[str, dict] = {}
        if self.path is None:
            return
        rows = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the line a kill cut short
                    break
        if rows and rows[0].get("settings") != settings:
            raise ConfigError(f"{self.path} holds responses sampled with {rows[0].get('settings')}, not {settings}: "
                              f"move it away to start over")  # fmt: skip
        self.done = {r["id"]: r for r in rows[1:]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in (rows[:1] or [{"settings": settings}]))
                             + "".join(json.dumps(r) + "\n" for r in self.done.values()))  # fmt: skip

    def add(self, row: dict) -> None:
        self.done[row["id"]] = row
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def generate_responses(cfg: EvalToolConfig, problems, protocol: Protocol) -> tuple[list, list, dict]:
    """k responses per problem from the engine: (texts, truncated flags, generation facts).
    With ``--out`` the responses are logged as they come and a rerun resumes (``ResponseLog``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    ids = [render_prompt(tok, p.messages) for p in problems]
    context = engine_context(cfg)
    budget = token_budget(cfg, protocol, context, max(map(len, ids)))
    params = eval_sampling(tok, protocol.k, protocol.temperature, protocol.top_p, budget, cfg.seed,
                           stop_token_ids(tok, cfg.model))  # fmt: skip
    params = dataclasses.replace(params, top_k=cfg.top_k)
    sampled = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed")
    positions = {"model": cfg.model, "rope_scaling": cfg.rope_scaling, "context_length": context}
    log = ResponseLog(cfg.out, {k: getattr(params, k) for k in sampled} | positions)
    todo = [i for i, p in enumerate(problems) if p.id not in log.done]
    if len(todo) < len(problems):
        print(f"eval: {len(problems) - len(todo)} problems already answered in {log.path}", file=sys.stderr)
    if todo:
        engine = build_engine(cfg)
        try:
            with heartbeat(f"eval: {protocol.k} samples for each of {len(todo)} problems, up to {budget} tokens"):
                for j, group in engine.generate_stream([ids[i] for i in todo], params):
                    log.add(dict(id=problems[todo[j]].id, responses=[decode_response(tok, c.output_ids) for c in group],
                                 truncated=[c.finish_reason != "stop" for c in group],
                                 tokens=[len(c.output_ids) for c in group]))  # fmt: skip
        finally:
            engine.shutdown()
    rows = [log.done[p.id] for p in problems]
    lengths = [n for r in rows for n in r["tokens"]]
    cut = [r["truncated"] for r in rows]
    facts = dict(max_new_tokens=budget, context_length=context, rope_scaling=cfg.rope_scaling, engine=cfg.engine,
                 response_length=sum(lengths) / len(lengths), truncated=sum(map(sum, cut)) / len(lengths))  # fmt: skip
    return [r["responses"] for r in rows], cut, facts


def evaluate_benchmark(cfg: EvalToolConfig) -> dict:
    """A named benchmark: its problems, k responses each (generated, or ``--responses``),
    scored and reported (and written to ``--out``)."""
    problems, stats = load_problems(cfg.benchmark, cfg.data, question_key=cfg.question_key, answer_key=cfg.answer_key,
                                    id_key=cfg.id_key, instruction=cfg.instruction, start_date=cfg.start_date,
                                    end_date=cfg.end_date)  # fmt: skip
    problems = problems[: cfg.max_prompts] if cfg.max_prompts else problems
    protocol = cfg.protocol()
    print(f"{cfg.benchmark}: {len(problems)} problems ({stats})", file=sys.stderr, flush=True)
    if cfg.responses is not None:
        texts, cut, others = read_responses(cfg.responses, problems)
        if cfg.k is not None and len(texts[0]) != cfg.k:
            raise ConfigError(f"k={cfg.k} but {cfg.responses} has {len(texts[0])} responses per problem")
        facts = dict(responses=str(cfg.responses), responses_of_other_problems=others)
    else:
        texts, cut, facts = generate_responses(cfg, problems, protocol)
    code = dataclasses.replace(EVAL_CODE, **cfg.code)
    code.validate("code")
    with heartbeat(f"eval: scoring {sum(map(len, texts))} responses"):
        scored = score_problems(problems, texts, cut, workers=cfg.reward_workers, code=code)
    sampling = {"k": len(texts[0]), "temperature": protocol.temperature, "top_p": protocol.top_p, "top_k": cfg.top_k}
    report = summarize(problems, scored, cfg.benchmark, {**sampling, **facts})
    if cfg.out:
        write_results(cfg.out, problems, texts, scored, report)
    return report


def run(cfg: EvalToolConfig, prompts: Optional[list[str]]):
    """The rows of ``--prompt``, or the report of a benchmark or of our RL prompt sets."""
    if cfg.model is not None:
        read_config_dict(cfg.model)  # a directory without a model: one line before anything loads
    if cfg.benchmark != RL_SCHEMA and not prompts:
        return evaluate_benchmark(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    return sample_prompts(cfg, prompts, tok) if prompts else evaluate_rl_schema(cfg, tok)


def main(argv=None) -> int:
    """Progress goes to stderr; stdout holds only the result (the report as JSON, or the
    ``--prompt`` responses), so a script can read it."""
    a = parse_args(argv)
    prompts = getattr(a, "prompt", None)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(load_eval_config(a), prompts)
    except KlearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if prompts:
        for row in result:
            for i, r in enumerate(row["responses"]):
                print(f"=== prompt: {row['prompt']!r} | response {i + 1}/{len(row['responses'])}\n{r}")
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
