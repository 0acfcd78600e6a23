#!/usr/bin/env python
"""Run a Megatron checkpoint at TP x PP (x EP) and save its full float32 logits from rank 0.

    torchrun --nproc-per-node N tools/dump_logits.py --load DIR --tp T --pp P [--ep E --etp T] \\
        --input-ids IDS.json --out OUT.pt

--ep / --etp split a Qwen3-MoE model's experts over E ranks (and each expert over T ranks);
N must be a multiple of tp x pp and of etp x ep x pp (EP may share ranks with TP: TP=2 x EP=2
runs on 2 processes).

IDS.json is a list of equal-length token-id lists. OUT.pt holds a [batch, seq, vocab]
float32 tensor (vocab unpadded). Use it to check a conversion against HF transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_klear.checkpoint.megatron_ckpt import load_model, read_marker
from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
from megatron_klear.models.config import Qwen3Config, validate_parallel
from megatron_klear.models.forward import forward_logits, send_to_rank0
from megatron_klear.models.qwen3 import ModelOptions, build_model


def read_input_ids(path: str, vocab_size: int):
    """Validate and load IDS.json into a LongTensor; errors name the file and the row."""
    import torch

    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read token ids ({e})")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise SystemExit(f"error: {path}: expected a non-empty list of non-empty token-id lists")
    if len({len(r) for r in rows}) != 1:
        raise SystemExit(f"error: {path}: rows have different lengths {sorted({len(r) for r in rows})}")
    for i, r in enumerate(rows):
        bad = [t for t in r if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise SystemExit(f"error: {path}: row {i} has ids outside [0, {vocab_size}): {bad[:5]}")
    return torch.tensor(rows, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (Qwen3-MoE)")
    p.add_argument("--etp", type=int, default=1, help="expert tensor-parallel size (Qwen3-MoE)")
    p.add_argument("--input-ids", required=True, help="JSON list of equal-length token-id lists")
    p.add_argument("--out", required=True, help="output .pt file")
    a = p.parse_args(argv)

    import torch

    read_marker(a.load)
    cfg = Qwen3Config.from_dict(json.loads((Path(a.load) / "config.json").read_text()))
    validate_parallel(cfg, a.tp, a.pp, a.ep, a.etp)
    ids = read_input_ids(a.input_ids, cfg.vocab_size)
    init_distributed(ParallelConfig(tp=a.tp, pp=a.pp, expert_parallel=a.ep, expert_tensor_parallel=a.etp))
    try:
        model = build_model(cfg, ModelOptions(), init_weights=False)
        load_model(model, a.load)
        logits = send_to_rank0(forward_logits(model, ids, cfg.vocab_size))
        if torch.distributed.get_rank() == 0:
            torch.save(logits.float().cpu(), a.out)
            print(f"wrote {a.out}: logits {tuple(logits.shape)}")
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
