#!/usr/bin/env python
"""GPU check of the colocated (CUDA IPC) weight payloads; for tools/gpu_check.sh.

    python tools/check_cuda_ipc_payload.py [--json OUT.json]

SGLang cannot be installed on our GPU test machine, so this checks our side of
``update_weights_from_tensor`` with torch alone: a bucket of mixed dtypes is flattened on this
GPU and serialized exactly as ``sync.colocated`` does (``sglang_api.flatten_bucket`` +
``sync.ipc.serialize_payload``); a second process on the same GPU then does what an SGLang TP
rank does with its payload (base64-decode, unpickle with the GPU's UUID mapped to its index,
``FlattenedTensorBucket.reconstruct_tensors``: slice, view as the dtype, reshape) and returns
checksums. It checks that every tensor arrives bit-identical, on the same GPU, through an IPC
handle (no copy through the host) that names the GPU by UUID as SGLang's senders do, that the
pickle refers only to torch, ``types.SimpleNamespace`` and builtins (what SGLang's unpickler
allows), and that each training rank's own-GPU plan (``sync.colocated``) picks this GPU.
Exit status 0 when all hold; the JSON lists each check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_klear.inference import sglang_api as api  # noqa: E402
from megatron_klear.sync import ipc  # noqa: E402
from megatron_klear.sync.colocated import local_device_index, my_slots, senders  # noqa: E402
from megatron_klear.sync.ipc import ColocatedTarget  # noqa: E402

_RECEIVER = r"""
import json, sys
import torch
from megatron_klear.sync.ipc import load_payload
sent = []
obj = load_payload(sys.stdin.read(), sent)
flat = obj["flattened_tensor"]
out = {"device": str(flat.device), "is_cuda": flat.is_cuda, "ptr": flat.data_ptr(), "sums": [], "sent": sent}
for m in obj["metadata"]:
    t = flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)
    out["sums"].append([m.name, float(t.double().sum()), list(t.shape), str(t.dtype)])
torch.cuda.synchronize()
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="check_cuda_ipc_payload.json")
    a = p.parse_args(argv)
    checks: dict[str, bool] = {}
    if not torch.cuda.is_available():
        print("no GPU: nothing to check", file=sys.stderr)
        return 2
    dev = local_device_index()
    g = torch.Generator(device=f"cuda:{dev}").manual_seed(0)
    bucket = [
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(64, 33, device=f"cuda:{dev}", generator=g).bfloat16()),
        ("model.norm.weight", torch.randn(33, device=f"cuda:{dev}", generator=g)),
        ("lm_head.weight", torch.randn(17, 64, device=f"cuda:{dev}", generator=g)),
    ]
    flat, meta = api.flatten_bucket(api.bucket_order(bucket))
    payload = ipc.serialize_payload(flat, meta)
    found = ipc.payload_globals(payload)
    checks["pickle names only globals SGLang's unpickler allows (ipc.PAYLOAD_GLOBALS)"] = found <= ipc.PAYLOAD_GLOBALS
    r = subprocess.run(
        [sys.executable, "-c", _RECEIVER], input=payload, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    ours = {n: float(t.double().sum()) for n, t in bucket}
    checks["the receiving process rebuilt the bucket"] = got is not None
    if got is not None:
        checks["on this GPU"] = got["is_cuda"] and got["device"] == f"cuda:{dev}"
        checks["every tensor bit-identical"] = all(ours[n] == s for n, s, _, _ in got["sums"])
        checks["through an IPC handle, not a host copy"] = got["ptr"] != 0
        checks["the handle names the GPU by UUID"] = got["sent"] == [str(torch.cuda.get_device_properties(dev).uuid)]
    torch.cuda.ipc_collect()
    targets = [ColocatedTarget("http://engine", [dev])]
    checks["this rank serializes for and posts to the server on its GPU"] = my_slots(targets, dev, True) == [
        (0, 0)
    ] and senders(targets, dev, True) == [0]
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    Path(a.json).write_text(json.dumps({"checks": checks, "pickle_globals": sorted(found),
                                        "receiver_stderr": r.stderr[-2000:]}, indent=1))  # fmt: skip
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
