#!/usr/bin/env python
"""Write our synthetic math / code / SFT data in the real formats, deterministic by seed.

python tools/make_data.py --out DIR [--seed 0 --math 2000 --code 60 --test 200 --levels 1,2,3,4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.data.synthetic import make_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--math", type=int, default=2000, help="math training prompts")
    p.add_argument("--code", type=int, default=60, help="code training problems")
    p.add_argument("--test", type=int, default=200, help="held-out math prompts")
    p.add_argument("--levels", default="1,2,3,4", help="math levels, comma-separated (0..4; 0: the demo task)")
    a = p.parse_args(argv)
    levels = tuple(int(x) for x in a.levels.split(","))
    for name, path in make_dataset(a.out, a.seed, a.math, a.code, a.test, levels).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
