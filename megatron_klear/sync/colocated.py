"""Colocated weight sync into SGLang servers that share the trainer's GPUs (CUDA IPC), from
every training rank (the engine's single-process path is ``sync.ipc.IPCTransport``).

Each SGLang TP rank reads payload ``i`` of ``update_weights_from_tensor`` and rebuilds the
tensors from the IPC handles in it, which must point at memory on its own GPU. So every
training rank builds the bucket on its own GPU (``local_hf_buckets``: the TP all-gather leaves
full tensors on every rank; pipeline parallelism 1), serializes it if an engine TP rank sits
on that GPU, and the payloads are gathered to the rank on each server's first GPU, which posts
them; the servers are fed concurrently, one sender each. No GPU's bucket is copied to another
GPU, and no rank needs to see any GPU but its own (as slime and SGLang's own weight_sync do).
On CPU (the tests) the same path runs with shared-memory tensors and gloo.

The engine object lives on global rank 0, which opens and closes the update; the per-bucket
verdicts are gathered so that every rank raises together.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_klear.distributed import broadcast_object
from megatron_klear.errors import EngineError
from megatron_klear.inference import http
from megatron_klear.inference import sglang_api as api
from megatron_klear.models.config import Qwen3Config
from megatron_klear.sync.gather import local_hf_buckets
from megatron_klear.sync.ipc import ColocatedTarget, serialize_payload, share_cpu_tensors

_POST_TIMEOUT_S = 3600.0


def local_device_index() -> int:
    """This rank's GPU index on its node (``LOCAL_RANK`` on CPU, where it names the "GPU" a
    CPU server of the tests stands for)."""
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0"))


def my_slots(targets: Sequence[ColocatedTarget], device: int, on_engine_node: bool) -> list[tuple[int, int]]:
    """``(server index, TP rank)`` of every engine TP rank on this rank's GPU."""
    if not on_engine_node:
        return []
    return [(i, r) for i, t in enumerate(targets) for r, g in enumerate(t.gpus) if g == device]


def assemble(targets: Sequence[ColocatedTarget], gathered: Sequence[dict]) -> dict[int, list[str]]:
    """Per server, its payloads in TP order from every rank's ``{(server, tp rank): payload}``;
    raises ``EngineError`` naming a TP rank whose GPU no training rank holds."""
    merged: dict[tuple[int, int], str] = {}
    for part in gathered:
        merged.update(part)
    out = {}
    for i, t in enumerate(targets):
        missing = [r for r in range(len(t.gpus)) if (i, r) not in merged]
        if missing:
            raise EngineError(
                f"no training rank sits on GPU {[t.gpus[r] for r in missing]} of {t.url} (TP ranks {missing}): "
                "colocated servers must use the trainer's GPUs"
            )
        out[i] = [merged[(i, r)] for r in range(len(t.gpus))]
    return out


def senders(targets: Sequence[ColocatedTarget], device: int, on_engine_node: bool) -> list[int]:
    """The servers this rank posts to: those whose first GPU (TP rank 0) is its own."""
    return [i for i, t in enumerate(targets) if on_engine_node and t.gpus[0] == device]


def sync_colocated(
    engine,
    targets: Sequence[ColocatedTarget],
    model: torch.nn.Module,
    cfg: Qwen3Config,
    version: str,
    bucket_bytes: int,
) -> tuple[Optional[str], int, int, int]:
    """Collective over every rank: one colocated sync. ``engine`` is given on global rank 0
    (it opens and closes the update). Returns (error or None, bytes, buckets, tensors), the
    same on every rank."""
    rank0 = dist.get_rank() == 0
    error: Optional[str] = None
    if rank0:
        try:
            engine.begin_update(version)
        except EngineError as e:
            error = f"begin_update: {e}"
    error = broadcast_object(error)
    engine_host = broadcast_object(socket.gethostname() if rank0 else None)
    on_node = socket.gethostname() == engine_host
    device = local_device_index()
    mine, sends = my_slots(targets, device, on_node), senders(targets, device, on_node)
    if not torch.cuda.is_available():
        share_cpu_tensors()
    nbytes = nbuckets = ntensors = 0
    for bucket in local_hf_buckets(model, cfg, bucket_bytes):  # every rank iterates to the end
        nbuckets += 1
        ntensors += len(bucket)
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        flat, meta = api.flatten_bucket(api.bucket_order(bucket))
        payloads = {slot: serialize_payload(flat, meta) for slot in mine} if error is None else {}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, payloads)  # IPC handles only: a few KB per rank
        local_error = None
        if error is None and sends:
            try:
                local_error = _post_all(targets, assemble(targets, gathered), sends, version)
            except EngineError as e:
                local_error = str(e)
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, local_error)  # also keeps every flat alive until all answered
        del flat
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
        error = error or next((e for e in errors if e is not None), None)
    if rank0 and error is None:
        try:
            engine.finish_update()
        except EngineError as e:
            error = str(e)
    return broadcast_object(error), nbytes, nbuckets, ntensors


def _post_all(targets: Sequence[ColocatedTarget], payloads: dict[int, list[str]], sends: list[int], version: str):
    """Post this rank's servers' payloads concurrently; the first error, or None."""
    t0 = time.time()

    def post(i: int) -> None:
        body = api.update_from_tensor_request(payloads[i], version)
        http.post_checked(targets[i].url + "/update_weights_from_tensor", body, _POST_TIMEOUT_S)

    with ThreadPoolExecutor(len(sends)) as pool:
        futures = [pool.submit(post, i) for i in sends]
    for i, f in zip(sends, futures):
        if f.exception() is not None:
            return f"{targets[i].url}: {f.exception()} (after {time.time() - t0:.1f} s)"
    return None
