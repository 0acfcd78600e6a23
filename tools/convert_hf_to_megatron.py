#!/usr/bin/env python
"""Convert an HF Qwen3 model directory into a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N --pp N --ep N] [--force]

The checkpoint loads at any TP/PP (and EP for Qwen3-MoE) that divides the model, whatever
--tp/--pp/--ep wrote it; a larger layout only spreads the conversion's memory over more
processes (--ep: each holds 1/N of the experts).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.checkpoint.convert import hf_to_megatron
from megatron_klear.cli import OneLineParser
from megatron_klear.errors import KlearError


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size to write with (Qwen3-MoE)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output directory (never one that is or contains the input)",
    )
    a = p.parse_args(argv)
    try:
        hf_to_megatron(a.hf, a.out, tp=a.tp, pp=a.pp, force=a.force, ep=a.ep)
    except (KlearError, OSError) as e:  # every user error: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} (tp={a.tp}, pp={a.pp}, ep={a.ep})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
