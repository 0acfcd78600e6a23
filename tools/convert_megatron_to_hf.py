#!/usr/bin/env python
"""Convert a megatron-klear Megatron checkpoint back into an HF directory.

    python tools/convert_megatron_to_hf.py --load DIR --out DIR [--force] [--max-shard-gb 2]

Writes sharded safetensors with an index, config.json and the tokenizer files; the result
loads offline with transformers. A round trip HF -> Megatron -> HF is bit-identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.checkpoint.convert import megatron_to_hf
from megatron_klear.cli import OneLineParser
from megatron_klear.errors import KlearError


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output directory (never one that is or contains the input)",
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard")
    a = p.parse_args(argv)
    try:
        megatron_to_hf(a.load, a.out, force=a.force, max_shard_bytes=int(a.max_shard_gb * 1024**3))
    except (KlearError, OSError) as e:  # every user error: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
