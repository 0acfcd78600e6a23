#!/usr/bin/env python
"""Conversion throughput: a synthetic ~1B-parameter Qwen3 HF -> Megatron -> HF.

    python tools/bench_convert.py [--out-dir DIR] [--json OUT.json] [--tp 1 --pp 1]

Prints MB/s and peak private memory (USS summed over the converter's process tree) for each direction.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_klear.checkpoint.hf_io import HFWriter
from megatron_klear.models import hf_mapping
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.shapes import qwen3_config_dict

# About 1.1B parameters: Qwen3-1.7B's vocabulary and head layout, 16 layers instead of 28.
SYNTHETIC_1B = qwen3_config_dict("1.7b", num_hidden_layers=16)


class PeakRSS:
    """Samples the summed USS (private resident memory) of this process and its descendants.

    USS leaves out file pages mapped from the checkpoint (page cache, reclaimable) and pages
    a forked writer shares with its parent, which PSS or RSS would count again.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_full_info().uss  # private memory: shared pages and page cache excluded
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_synthetic(out: Path, cfg_dict: dict) -> int:
    import torch

    cfg = Qwen3Config.from_dict(cfg_dict)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg_dict))
    w = HFWriter(out)
    g = torch.Generator().manual_seed(0)
    for name, shape in hf_mapping.hf_tensor_shapes(cfg).items():
        w.add(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    w.close()
    return w.total_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", default="bench_convert.json")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=SYNTHETIC_1B["num_hidden_layers"])
    a = p.parse_args(argv)
    cfg = dict(SYNTHETIC_1B, num_hidden_layers=a.layers)
    scratch = Path(a.out_dir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        # In a child process, so this process stays as lean as the conversion CLI's parent.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            nbytes = pool.submit(write_synthetic, scratch / "hf", cfg).result()
        rows = []
        for name, fn in (
            (
                f"HF -> Megatron (tp={a.tp}, pp={a.pp})",
                lambda: hf_to_megatron(str(scratch / "hf"), str(scratch / "mg"), tp=a.tp, pp=a.pp),
            ),
            ("Megatron -> HF", lambda: megatron_to_hf(str(scratch / "mg"), str(scratch / "hf2"))),
        ):
            t = time.time()
            with PeakRSS() as rss:
                fn()
            secs = time.time() - t
            rows.append(
                dict(
                    direction=name,
                    seconds=round(secs, 2),
                    mb_per_s=round(nbytes / 1e6 / secs, 1),
                    peak_uss_gb=round(rss.peak / 1e9, 2),
                )
            )
        params = hf_mapping.num_params(Qwen3Config.from_dict(cfg))
        result = dict(params=params, model_gb=round(nbytes / 1e9, 2), cpu_count=psutil.cpu_count(), rows=rows)
        print(f"synthetic Qwen3: {params / 1e9:.2f}B params, {nbytes / 1e9:.2f} GB bf16")
        print("| direction | seconds | MB/s | peak private memory (GB) |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['direction']} | {r['seconds']} | {r['mb_per_s']} | {r['peak_uss_gb']} |")
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")
    finally:
        if a.out_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
