"""The SGLang HTTP requests we send and the answers we read, as plain functions, and SGLang's
flattened weight bucket (the byte layout both weight transports send).

Every request body is built here and nowhere else; field names follow SGLang 0.5.23's
``srt/managers/io_struct.py`` and ``sampling/sampling_params.py``, and what the real server and
sglang-router 0.3.2 do with them is tested in tests/e2e/test_sglang_real.py. The client that
sends them is ``inference.http``; the weight transports are ``sync.ipc`` and ``sync.broadcast``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from megatron_klear.errors import ArgumentError, ConfigError, EngineError
from megatron_klear.inference.base import Bucket, Completion, SamplingParams

# ---------------------------------------------------------------------------- requests


def sampling_params_json(p: SamplingParams, seed: Optional[int] = None) -> dict:
    """SGLang ``sampling_params`` of one sample (we repeat prompts for n); ``seed`` is that
    sample's own ``sampling_seed`` (used by SGLang's deterministic inference)."""
    body = {
        "temperature": float(p.temperature),
        "top_p": float(p.top_p),
        "top_k": int(p.top_k),
        "max_new_tokens": int(p.max_new_tokens),
        "n": 1,
        "stop_token_ids": [int(t) for t in p.stop_token_ids],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "ignore_eos": bool(p.ignore_eos),
    }
    if seed is not None:
        body["sampling_seed"] = int(seed)
    return body


def sample_seeds(p: SamplingParams, first_index: int, count: int) -> list[Optional[int]]:
    """Every sample its own seed, ``p.seed + index`` (index over the whole call): with one
    seed for all, SGLang's deterministic inference makes the n copies of a prompt identical."""
    if p.seed is None:
        return [None] * count
    return [int(p.seed) + first_index + k for k in range(count)]


def generate_request(ids: Sequence[int], p: SamplingParams, seed: Optional[int]) -> dict:
    """POST /generate of one sample. One request per sample, not a batch: sglang-router 0.3.2
    accepts only one ``sampling_params`` object per request (a list is rejected with 422), and
    each sample needs its own seed; the radix cache shares the prompt's KV across requests
    and the cache-aware router sends a prompt's samples to the same server."""
    return {
        "input_ids": [int(t) for t in ids],
        "sampling_params": sampling_params_json(p, seed),
        "return_logprob": True,
    }


def score_request(sequences: Sequence[list[int]]) -> dict:
    """POST /generate that only scores the input: log-probs of every input token. SGLang
    computes input log-probs from the raw logits whatever the temperature (seen on 0.5.23),
    so these are at temperature 1."""
    return {
        "input_ids": [[int(t) for t in s] for s in sequences],
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def update_from_tensor_request(payloads: list[str], version: str) -> dict:
    """POST /update_weights_from_tensor: one serialized flattened bucket per engine TP rank."""
    return {
        "serialized_named_tensors": list(payloads),
        "load_format": "flattened_bucket",
        "flush_cache": True,
        "weight_version": version,
    }


def init_group_request(
    master_address: str, master_port: int, rank_offset: int, world_size: int, group: str, backend: str = "nccl"
) -> dict:
    """POST /init_weights_update_group: the engine's ranks join ours at ``rank_offset``."""
    return {
        "master_address": master_address,
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "group_name": group,
        "backend": backend,
    }


def destroy_group_request(group: str) -> dict:
    """POST /destroy_weights_update_group: the engine leaves a group we are replacing."""
    return {"group_name": group}


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.bfloat16' -> 'bfloat16', the form SGLang maps back with getattr(torch, name)."""
    return str(dtype).removeprefix("torch.")


def update_from_distributed_request(bucket: Bucket, group: str, version: str) -> dict:
    """POST /update_weights_from_distributed for one bucket sent as one broadcast of its
    ``flatten_bucket`` bytes (SGLang's ``FlattenedTensorBucket.empty`` lays the receive
    buffer out from these names, dtypes and shapes in this order)."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group,
        "flush_cache": True,
        "weight_version": version,
        "load_format": "flattened_bucket",
    }


def memory_request(tags: Sequence[str]) -> dict:
    """POST /release_memory_occupation and /resume_memory_occupation."""
    bad = set(tags) - {"weights", "kv_cache", "cuda_graph"}
    if bad:
        raise ConfigError(f"unknown memory tags {sorted(bad)}")
    return {"tags": list(tags)}


def register_worker_request(url: str) -> dict:
    """POST /workers on the router (sglang-router 0.3.2 answers 202 and adds it in the
    background; DELETE /workers/{id} takes the id it lists, not the URL)."""
    return {"url": url}


def abort_request() -> dict:
    """POST /abort_request."""
    return {"abort_all": True}


def pause_request() -> dict:
    """POST /pause_generation: abort what is in flight (returned with finish_reason "abort")
    and hold new requests until /continue_generation."""
    return {"mode": "abort"}


def continue_request() -> dict:
    """POST /continue_generation."""
    return {}


def begin_update_request() -> dict:
    """POST /begin_weight_update (since 0.5.21 every weight update must run inside one)."""
    return {}


def end_update_request() -> dict:
    """POST /end_weight_update."""
    return {}


# ---------------------------------------------------------------------------- responses


def parse_generate_response(body: Any, expected: int, weight_version: Optional[str] = None) -> list[Completion]:
    """One ``Completion`` per request entry; anything malformed raises ``EngineError``, and so
    does a sample that reports weights other than ``weight_version`` (when given): a server the
    router should no longer have used, such as one restarted with its initial weights."""
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or len(body) != expected:
        n = len(body) if isinstance(body, list) else 0
        raise EngineError(f"/generate returned {n} results, expected {expected}")
    out = []
    for item in body:
        meta = item.get("meta_info") or {}
        fr = meta.get("finish_reason") or {}
        reason = fr.get("type") if isinstance(fr, dict) else str(fr)  # "abort": paused or shutting down
        if reason not in ("stop", "length", "abort"):
            raise EngineError(f"/generate: unexpected finish_reason {fr!r}")
        served = meta.get("weight_version")
        if weight_version is not None and served is not None and served != weight_version:
            raise EngineError(f"/generate: sampled with weight version {served!r}, expected {weight_version!r}")
        ids = [int(t) for t in item.get("output_ids", [])]
        lps = [float(e[0]) for e in meta.get("output_token_logprobs", [])]
        out.append(Completion(ids, lps, reason))
    return out


def parse_score_response(body: Any, sequences: Sequence[list[int]]) -> list[list[float]]:
    if isinstance(body, dict):
        body = [body]
    if len(body) != len(sequences):
        raise EngineError(f"scoring returned {len(body)} results for {len(sequences)} sequences")
    res = []
    for item, seq in zip(body, sequences):
        entries = item["meta_info"]["input_token_logprobs"]
        lps = [float(e[0]) for e in entries[1:]]  # the first token has no log-prob
        if len(lps) != len(seq) - 1:
            raise EngineError(f"scoring returned {len(lps)} log-probs for a {len(seq)}-token sequence")
        res.append(lps)
    return res


# ---------------------------------------------------------------------------- the flattened bucket


def bucket_order(bucket: Bucket) -> Bucket:
    """The bucket with wider dtypes first: in SGLang's byte-flattened bucket every tensor must
    start at a multiple of its element size (``FlattenedTensorBucket.empty`` checks it), which
    this order guarantees (sizes of a wider dtype are multiples of every narrower one)."""
    return sorted(bucket, key=lambda kv: -kv[1].element_size())


def flatten_bucket(bucket: Bucket) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """SGLang 0.5.23's flattened bucket of an ordered bucket (``bucket_order``): one uint8
    tensor of every tensor's bytes, and per tensor ``name, shape, dtype, start_idx, end_idx,
    numel`` in bytes (``FlattenedTensorBucket.reconstruct_tensors`` slices, views as the dtype
    and reshapes). The metadata are ``types.SimpleNamespace`` objects: SGLang's unpickler
    allows that class and reads the fields by attribute, so the trainer needs no sglang."""
    parts, meta, start = [], [], 0
    for name, t in bucket:
        if start % t.element_size():
            raise ArgumentError(
                f"{name} would start at byte {start}, not a multiple of {t.element_size()}: use bucket_order"
            )
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        parts.append(flat)
        meta.append(SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                    end_idx=start + flat.numel(), numel=flat.numel()))  # fmt: skip
        start += flat.numel()
    return torch.cat(parts), meta
