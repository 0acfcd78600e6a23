#!/usr/bin/env python
"""Create a random-initialised Qwen3 HF model directory with a locally built tokenizer.

python tools/make_tiny_model.py --out /tmp/tiny [--layers 2 --hidden 64 --heads 4 --kv-heads 2
    --head-dim 32 --ffn 128 --vocab 512 --tie-embeddings --dtype float32]

A tiny Qwen3-MoE (Qwen3MoeForCausalLM, hub-format per-expert tensors):

python tools/make_tiny_model.py --out /tmp/tiny-moe --moe [--experts 8 --experts-per-tok 2
    --moe-ffn 32 --mlp-only-layers 1 --no-norm-topk-prob --router-scale 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_klear.models.config import load_hf_config
from megatron_klear.models.hf_mapping import active_params, num_params
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    defaults = TinyModelArgs()
    for f in fields(TinyModelArgs):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            p.add_argument(flag, type=int, nargs="*", default=default)
        elif default is None:  # a mapping (rope_scaling), given as JSON
            p.add_argument(flag, type=json.loads, default=None, help='JSON, e.g. \'{"rope_type": "yarn"}\'')
        else:
            p.add_argument(flag, type=type(default), default=default)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        p.error(f"{out}: output directory exists and is not empty; pass --force to replace it")
    args = TinyModelArgs(**{f.name: getattr(a, f.name) for f in fields(TinyModelArgs)})
    make_tiny_model(out, args)

    cfg = load_hf_config(out)
    active = f" ({active_params(cfg):,} active per token)" if cfg.moe else ""
    print(f"wrote {out}: {'Qwen3-MoE' if cfg.moe else 'Qwen3'} with {num_params(cfg):,} parameters{active}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
