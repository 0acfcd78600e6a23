"""The options of ``tools/eval.py`` as one typed config: the keys of its ``--config`` YAML
(e.g. examples/qwen3_8b/eval_64k.yaml), which its flags override, checked at load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from megatron_klear.config import FilePath
from megatron_klear.errors import ConfigError
from megatron_klear.evals.benchmarks import BENCHMARKS, Protocol

RL_SCHEMA = "rl"  # prompt files in our RL schema, scored by the training reward (rl.evaluate)
RL_PROTOCOL = Protocol("any", k=4, max_new_tokens=0)  # our RL sets: the budget is all the context leaves


@dataclass
class EvalToolConfig:
    """Every option of tools/eval.py (``--config`` YAML keys; flags override them)."""

    model: Optional[FilePath] = None  # HF model directory (weights + tokenizer)
    benchmark: str = RL_SCHEMA  # one of evals.benchmarks.BENCHMARKS, or "rl": prompt files in our RL schema
    data: list[FilePath] = field(default_factory=list)  # the benchmark's rows (.jsonl / .json / .parquet)
    responses: Optional[FilePath] = None  # score these responses ({"id", "responses"} rows) instead of generating
    k: Optional[int] = None  # samples per problem (default: the protocol's)
    temperature: Optional[float] = None  # default: the protocol's (0.6)
    top_p: Optional[float] = None  # default: the protocol's (0.95)
    top_k: int = -1  # -1: the whole vocabulary (the public inference.py samples with 20)
    max_new_tokens: Optional[int] = None  # default: the protocol's budget, capped by context - longest prompt
    context_length: Optional[int] = None  # the engine's context (default: what the model reaches)
    rope_scaling: Optional[dict] = None  # YaRN over the model's config, e.g. {rope_type: yarn, factor: 2.5, ...}
    question_key: Optional[str] = None  # math rows: the question's column (dotted: into objects)
    answer_key: Optional[str] = None  # math rows: the answer's column
    id_key: Optional[str] = None  # math rows: the id's column (default: id, ..., else the row number)
    instruction: Optional[str] = None  # math: text appended to each question (default: none, as the public files)
    start_date: Optional[str] = None  # LiveCodeBench: contest window start (YYYY-MM-DD), replacing the protocol's
    end_date: Optional[str] = None  # LiveCodeBench: contest window end (inclusive)
    max_prompts: int = 0  # evaluate the first N problems only; 0: all
    seed: int = 0  # sampling seed (SGLang: sample j of a problem gets seed + j)
    engine: str = "hf"  # "hf" (transformers in process) or "sglang"
    device: str = "cpu"  # hf engine
    dtype: Optional[str] = None  # hf engine: weights' dtype (default: the checkpoint's)
    sglang: dict = field(default_factory=dict)  # SGLangConfig fields for --engine sglang
    code: dict = field(default_factory=dict)  # CodeRewardConfig fields over the evaluation's (e.g. timeout_s)
    reward_workers: int = 4  # responses scored in parallel (code: sandboxed test runs)
    math_wrong_score: float = 0.0  # rl schema: the strict math reward of a wrong answer
    out: Optional[FilePath] = None  # JSONL: every problem's responses and verdicts, then the summary

    def validate(self, where: str = "eval") -> None:
        if self.benchmark != RL_SCHEMA and self.benchmark not in BENCHMARKS:
            raise ConfigError(f"benchmark must be one of {[RL_SCHEMA, *BENCHMARKS]}, got {self.benchmark!r}")
        if self.engine not in ("hf", "sglang"):
            raise ConfigError(f"engine must be 'hf' or 'sglang', got {self.engine!r}")
        if self.responses is not None and self.benchmark == RL_SCHEMA:
            raise ConfigError("responses needs a named benchmark (--benchmark), whose ids the rows carry")
        for name in ("start_date", "end_date"):
            value = getattr(self, name)
            try:
                value is None or datetime.strptime(value, "%Y-%m-%d")
            except ValueError:
                raise ConfigError(f"{name} must be a day as YYYY-MM-DD, got {value!r}") from None
        for name in ("k", "max_new_tokens", "reward_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")

    def protocol(self) -> Protocol:
        """The benchmark's protocol with this config's overrides."""
        base = BENCHMARKS.get(self.benchmark, RL_PROTOCOL)
        given = {n: getattr(self, n) for n in ("k", "temperature", "top_p", "max_new_tokens")}
        return dataclasses.replace(base, **{n: v for n, v in given.items() if v is not None})
