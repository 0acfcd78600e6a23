"""Evaluate a model on held-out prompts: avg@k (pass@1 averaged over k samples) and pass@k,
scored by the training reward code (strict: think block, boxed answer, not truncated) and, for
math prompts, also like the public KlearReasoner benchmarks/judge_math.py (eval/math/lenient_*:
math-verify on the whole response), the scoring behind published numbers.

    python tools/eval.py --model runs/tiny_rl_math/hf --data examples/data/math_test.parquet \
        --k 4 --out runs/eval/tiny_rl_math.jsonl
    python tools/eval.py --model runs/tiny_rl_math/hf --prompt "What is 12 + 30?" --k 2

``--out`` keeps every one of the k responses of each prompt. ``--prompt TEXT`` (repeatable)
samples free-text user prompts with the same settings and prints the responses (nothing to
score them against).

``--engine hf`` (default) runs transformers in process (CPU or one GPU); ``--engine sglang``
launches SGLang servers (``--sglang key=value`` sets SGLangConfig fields, e.g. replicas=8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_klear.config import apply_overrides, from_dict
from megatron_klear.data.chat import decode_response, render_prompt, stop_token_ids
from megatron_klear.data.rl import CurationConfig, load_rl_prompts
from megatron_klear.errors import KlearError
from megatron_klear.inference.hf import HFEngine
from megatron_klear.inference.sglang import SGLangConfig, SGLangEngine
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.rl.config import RewardConfig
from megatron_klear.rl.evaluate import eval_sampling, evaluate

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory (weights + tokenizer)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="prompt files in the RL schema (.parquet / .jsonl)")
    what.add_argument("--prompt", action="append", help="a free-text user prompt (repeatable): print k responses")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompts", type=int, default=0, help="0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "sglang"], default="hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sglang", nargs="*", default=[], help="SGLangConfig fields as key=value")
    p.add_argument("--reward-workers", type=int, default=4)
    p.add_argument("--math-wrong-score", type=float, default=0.0)
    p.add_argument("--out", default=None, help="JSONL of per-prompt results (all k responses) and the summary")
    a = p.parse_args(argv)
    try:
        return run(a)
    except KlearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sample_prompts(engine, tok, a: argparse.Namespace) -> int:
    """``--prompt``: k responses to each free-text prompt, printed (and written to ``--out``)."""
    ids = [render_prompt(tok, [{"role": "user", "content": text}]) for text in a.prompt]
    params = eval_sampling(tok, a.k, a.temperature, a.top_p, a.max_new_tokens, a.seed, stop_token_ids(tok, a.model))
    rows = []
    for text, group in zip(a.prompt, engine.generate(ids, params)):
        responses = [decode_response(tok, c.output_ids) for c in group]
        rows.append({"prompt": text, "responses": responses})
        for i, r in enumerate(responses):
            print(f"=== prompt: {text!r} | response {i + 1}/{len(responses)}\n{r}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


def run(a: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    if not (Path(a.model) / "config.json").is_file():
        print(f"error: {a.model} is not an HF model directory (no config.json)", file=sys.stderr)
        return 2
    prompts = []
    if a.data:
        prompts, _ = load_rl_prompts(a.data, CurationConfig(min_code_tests=0, dedup=False))
        if a.max_prompts:
            prompts = prompts[: a.max_prompts]
    tok = AutoTokenizer.from_pretrained(a.model)
    if a.engine == "hf":
        engine = HFEngine(a.model, device=a.device)
    else:
        engine = SGLangEngine(from_dict(SGLangConfig, apply_overrides({"model_path": a.model}, a.sglang), "--sglang"))
    if a.prompt:
        try:
            return sample_prompts(engine, tok, a)
        finally:
            engine.shutdown()
    rewards = RewardConfig(MathRewardConfig(wrong_score=a.math_wrong_score), CodeRewardConfig())
    try:
        res = evaluate(
            engine,
            tok,
            prompts,
            rewards,
            workers=a.reward_workers,
            k=a.k,
            temperature=a.temperature,
            top_p=a.top_p,
            max_new_tokens=a.max_new_tokens,
            seed=a.seed,
            stop_ids=stop_token_ids(tok, a.model),
            out_jsonl=Path(a.out) if a.out else None,
        )
    finally:
        engine.shutdown()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
