"""Every Triton kernel compiles for sm_90 and sm_80 with the real compiler (no GPU needed).

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts code that compiled
Triton refuses (a kernel reading a plain global, for one). This runs ``tests/triton_compile.py``
in a process without the interpreter; see ``megatron_klear.ops.triton_launch``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, never from a cache
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile", "--arch", "90", "80"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "megatron_klear.ops.triton_logprobs" in out["modules"]
    for kernel in ("_stats_kernel", "_grad_kernel"):
        for arch in ("sm_90", "sm_80"):
            assert any(kernel in c and c.endswith(arch) for c in out["compiled"]), (kernel, arch)
    # the backward both with and without the entropy gradient, in every logits dtype
    for dtype in ("float32", "bfloat16", "float16"):
        for ent in ("True", "False"):
            assert any(f"_grad_kernel [{dtype} " in c and f"entropy_grad={ent}]" in c for c in out["compiled"])
