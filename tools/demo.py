#!/usr/bin/env python
"""End-to-end demo on a 2-core CPU.

Today: make a tiny Qwen3, convert it to Megatron at TP=2 x PP=2, run it on 4 processes,
check its logits against HF transformers, convert it back and check the round trip.
(It grows into the full SFT -> RL demo.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step(name: str, report: list, fn):
    t = time.time()
    print(f"==> {name}", flush=True)
    result = fn()
    report.append((name, time.time() - t, result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="working directory")
    a = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hf, mg, back, logits_pt = out / "hf", out / "megatron_tp2_pp2", out / "hf_roundtrip", out / "logits.pt"
    report: list = []
    args = TinyModelArgs(layers=4, hidden=128, heads=8, kv_heads=2, head_dim=16, ffn=256, vocab=512)
    step("make tiny Qwen3 (HF)", report, lambda: make_tiny_model(hf, args) and "ok")
    step(
        "convert HF -> Megatron (tp=2, pp=2)",
        report,
        lambda: hf_to_megatron(str(hf), str(mg), tp=2, pp=2, force=True) or "ok",
    )

    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    (out / "ids.json").write_text(json.dumps(ids.tolist()))

    def run_megatron():
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            str(ROOT / "tools/dump_logits.py"),
            "--load",
            str(mg),
            "--tp",
            "2",
            "--pp",
            "2",
            "--input-ids",
            str(out / "ids.json"),
            "--out",
            str(logits_pt),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return "ok"

    step("run Megatron on 4 processes (gloo)", report, run_megatron)

    def compare():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(ids).logits.detach()
        ours = torch.load(logits_pt)
        rel = ((ours - ref).norm() / ref.norm()).item()
        if rel >= 1e-4:
            raise SystemExit(f"logits differ from HF transformers: relative error {rel:.2e}")
        return f"relative error {rel:.1e}"

    step("compare logits with HF transformers", report, compare)
    step("convert Megatron -> HF", report, lambda: megatron_to_hf(str(mg), str(back), force=True) or "ok")

    def roundtrip():
        x, y = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
        same = sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
        if not same:
            raise SystemExit("round trip is not bit-identical")
        return f"{len(x)} tensors bit-identical"

    step("check round trip", report, roundtrip)
    print("\n| step | seconds | result |\n|---|---:|---|")
    for name, secs, result in report:
        print(f"| {name} | {secs:.1f} | {result} |")
    print(f"\noutputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
