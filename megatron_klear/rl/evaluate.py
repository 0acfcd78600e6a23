"""avg@k (pass@1 averaged over k samples, the paper's metric) and pass@k on held-out prompts.

Two scorings of the same samples:
* strict (``eval/avg@k``, ``eval/pass@k``, ``eval/<ability>/avg@k``): the run's own reward
  config, as in training; by default a ``<think>`` block, a ``\\boxed{}`` answer after it and a
  response that was not cut at the length limit;
* lenient, math prompts only (``eval/math/lenient_avg@k``, ``eval/math/lenient_pass@k``): scored
  like the public KlearReasoner ``benchmarks/judge_math.py`` (math-verify on the whole response,
  no format rule, truncation not special), for comparison with published numbers.

Both overall, per ability and per data source (AIME24 and AIME25 stay apart). Generation and
scoring print heartbeat lines while they run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_klear.console import heartbeat
from megatron_klear.data.chat import decode_response, render_prompt, stop_token_ids
from megatron_klear.data.rl import RLPrompt
from megatron_klear.inference.base import Completion, InferenceEngine, SamplingParams
from megatron_klear.rewards.math import LENIENT
from megatron_klear.rl.config import RewardConfig
from megatron_klear.rl.rollout import score_groups


def eval_sampling(
    tokenizer,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: Optional[int],
    stop_ids: Optional[Sequence[int]] = None,
) -> SamplingParams:
    """How an evaluation samples: ``k`` responses per prompt, each ending at one of ``stop_ids``
    (default: ``stop_token_ids(tokenizer)``)."""
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        n=k,
        stop_token_ids=list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer),
        seed=seed,
    )


def evaluate(
    engine: InferenceEngine,
    tokenizer,
    prompts: Sequence[RLPrompt],
    rewards: RewardConfig,
    *,
    workers: int = 4,
    k: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    seed: Optional[int] = 0,
    stop_ids: Optional[Sequence[int]] = None,
    lenient_scores: bool = True,
    out_jsonl: Optional[Path] = None,
    step: Optional[int] = None,
) -> dict:
    """Generate ``k`` samples per prompt, score them; returns ``eval/...`` metrics.

    ``stop_ids``: the tokens that end a response (default: ``stop_token_ids(tokenizer)``; pass
    the model directory's, which include its generation_config.json). ``lenient_scores``: also score
    the math prompts like ``judge_math.py`` (module docstring)."""
    t0 = time.time()
    ids = [render_prompt(tokenizer, p.messages) for p in prompts]
    params = eval_sampling(tokenizer, k, temperature, top_p, max_new_tokens, seed, stop_ids)
    with heartbeat(f"eval: generating {k} samples for each of {len(prompts)} prompts"):
        completions = engine.generate(ids, params)
    with heartbeat(f"eval: scoring {k * len(prompts)} samples"):
        results = score_groups(tokenizer, prompts, completions, rewards, workers)
    per_prompt = [[r.correct for r in rs] for rs in results]
    lenient = lenient_math(tokenizer, prompts, completions, rewards, workers) if lenient_scores else {}
    metrics = {
        f"eval/avg@{k}": float(np.mean([np.mean(c) for c in per_prompt])),
        f"eval/pass@{k}": float(np.mean([any(c) for c in per_prompt])),
        "eval/reward_mean": float(np.mean([r.score for rs in results for r in rs])),
        "eval/sandbox_failures": sum(r.sandbox_failed for rs in results for r in rs),
        "eval/response_length": float(np.mean([len(c.output_ids) for g in completions for c in g])),
        "eval/prompts": len(prompts),
        "time/eval_s": time.time() - t0,
    }
    for ability in sorted({p.ability for p in prompts}):
        sel = [c for p, c in zip(prompts, per_prompt) if p.ability == ability]
        metrics[f"eval/{ability}/avg@{k}"] = float(np.mean([np.mean(c) for c in sel]))
    if lenient:
        metrics[f"eval/math/lenient_avg@{k}"] = float(np.mean([np.mean(c) for c in lenient.values()]))
        metrics[f"eval/math/lenient_pass@{k}"] = float(np.mean([any(c) for c in lenient.values()]))
    for source in sorted({p.data_source for p in prompts if p.data_source}):
        sel = [c for p, c in zip(prompts, per_prompt) if p.data_source == source]
        metrics[f"eval/source/{source}/avg@{k}"] = float(np.mean([np.mean(c) for c in sel]))
        metrics[f"eval/source/{source}/pass@{k}"] = float(np.mean([any(c) for c in sel]))
    if out_jsonl is not None:
        out_jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(out_jsonl, "a") as f:
            for i, (p, group, rs) in enumerate(zip(prompts, completions, results)):
                row = dict(
                    step=step,
                    uid=p.uid,
                    data_source=p.data_source,
                    ability=p.ability,
                    correct=[r.correct for r in rs],
                    scores=[r.score for r in rs],
                    reasons=[r.reason for r in rs],
                    responses=[decode_response(tokenizer, c.output_ids) for c in group],
                )
                if i in lenient:
                    row["lenient_correct"] = lenient[i]
                f.write(json.dumps(row) + "\n")
            f.write(json.dumps(dict(step=step, summary=metrics)) + "\n")
    return metrics


def lenient_math(
    tokenizer, prompts: Sequence[RLPrompt], completions: Sequence[list[Completion]], rewards: RewardConfig, workers: int
) -> dict[int, list[bool]]:
    """``{prompt index: correct per sample}`` for the math prompts, scored like the public
    ``judge_math.py`` (``rewards.math.LENIENT``, with the run's math-verify time limit)."""
    idx = [i for i, p in enumerate(prompts) if p.ability == "math"]
    if not idx:
        return {}
    judge = RewardConfig(math=replace(LENIENT, timeout_s=rewards.math.timeout_s), code=rewards.code)
    results = score_groups(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx], judge, workers)
    return {i: [r.correct for r in rs] for i, rs in zip(idx, results)}
