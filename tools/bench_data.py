#!/usr/bin/env python
"""Tokenise + pack throughput and cache size, on generated long-CoT-like data.

python tools/bench_data.py [--samples 4000 --seq-len 32768 --workers 1 2 --json bench_data.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.data.sft import SFTDataConfig, SFTDataset
from megatron_klear.data.synthetic import make_math_rows, sft_conversations
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model


def long_rows(n: int, seed: int) -> list[dict]:
    """SFT conversations with long reasoning: the synthetic steps repeated to ~1-3K tokens."""
    rng = random.Random(seed)
    rows = sft_conversations(make_math_rows(n, seed))
    for r in rows:
        a = r["messages"][-1]
        think, rest = a["content"].split("</think>")
        a["content"] = think + (" Let me double-check: " + think[8:]) * rng.randint(20, 60) + "</think>" + rest
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: our tiny one)")
    p.add_argument("--json", default="bench_data.json")
    a = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        tok = a.tokenizer or str(make_tiny_model(scratch / "tok", TinyModelArgs(vocab=2048, layers=1)))
        data = scratch / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_rows(a.samples, 0)))
        rows = []
        for w in a.workers:
            cfg = SFTDataConfig([str(data)], seq_len=a.seq_len, cache_dir=str(scratch / f"cache{w}"), workers=w)
            t = time.perf_counter()
            ds = SFTDataset(cfg, tok)
            t_tok = time.perf_counter() - t
            t = time.perf_counter()
            n_packs = 0
            for ids in ds.plan(0):
                ds.build(ids)
                n_packs += 1
            t_pack = time.perf_counter() - t
            tokens = ds.stats()["tokens"]
            cache_bytes = sum(f.stat().st_size for f in ds.caches[0].dir.iterdir())
            rows.append(
                dict(
                    workers=w,
                    tokens=tokens,
                    tokenize_tokens_per_s=tokens / t_tok,
                    pack_tokens_per_s=tokens / t_pack,
                    packs=n_packs,
                    fill=tokens / (n_packs * a.seq_len),
                    cache_mb_per_mtok=cache_bytes / 1e6 / (tokens / 1e6),
                )
            )
        print(f"{a.samples} samples, seq_len {a.seq_len}, tokenizer {'tiny' if a.tokenizer is None else a.tokenizer}")
        print("| workers | tokens | tokenise+cache tok/s | pack tok/s | packs | fill | cache MB per M tokens |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['workers']} | {r['tokens']} | {r['tokenize_tokens_per_s']:.0f} | {r['pack_tokens_per_s']:.0f} "
                f"| {r['packs']} | {r['fill']:.3f} | {r['cache_mb_per_mtok']:.2f} |"
            )
        Path(a.json).write_text(json.dumps(dict(samples=a.samples, seq_len=a.seq_len, rows=rows), indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
