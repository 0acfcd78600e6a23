"""The SGLang 0.5.x HTTP requests we send, as plain functions, plus a small JSON client.

Every request body is built here and nowhere else, so the contract tests
(tests/test_rollout.py, against a local recording server) cover exactly what we send.
Field names follow ``sglang/srt/managers/io_struct.py`` and ``sampling/sampling_params.py``.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

import torch

from megatron_klear.errors import EngineError
from megatron_klear.inference.base import Bucket, Completion, SamplingParams

# ---------------------------------------------------------------------------- requests


def sampling_params_json(p: SamplingParams) -> dict:
    """SGLang ``sampling_params``; one sample per request entry (we repeat prompts for n)."""
    body = {
        "temperature": float(p.temperature),
        "top_p": float(p.top_p),
        "top_k": int(p.top_k),
        "max_new_tokens": int(p.max_new_tokens),
        "n": 1,
        "stop_token_ids": [int(t) for t in p.stop_token_ids],
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if p.seed is not None:
        body["sampling_seed"] = int(p.seed)
    return body


def generate_request(prompts: Sequence[list[int]], p: SamplingParams) -> dict:
    """POST /generate. Each prompt is repeated ``n`` times (prompt-major) rather than sent with
    ``n > 1``: the response order is then the request order by construction, and the radix
    cache shares the prompt's KV anyway."""
    ids = [[int(t) for t in x] for x in prompts for _ in range(p.n)]
    return {"input_ids": ids, "sampling_params": sampling_params_json(p), "return_logprob": True}


def score_request(sequences: Sequence[list[int]], temperature: float) -> dict:
    """POST /generate that only scores the input: log-probs of every input token."""
    return {
        "input_ids": [[int(t) for t in s] for s in sequences],
        "sampling_params": {"temperature": float(temperature), "max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def update_from_tensor_request(payloads: list[str], version: str, flattened: bool = True) -> dict:
    """POST /update_weights_from_tensor: one serialized payload per engine TP rank."""
    return {
        "serialized_named_tensors": list(payloads),
        "load_format": "flattened_bucket" if flattened else None,
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
    """POST /update_weights_from_distributed for one bucket broadcast in this order."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group,
        "flush_cache": True,
        "weight_version": version,
    }


def memory_request(tags: Sequence[str]) -> dict:
    """POST /release_memory_occupation and /resume_memory_occupation."""
    bad = set(tags) - {"weights", "kv_cache", "cuda_graph"}
    if bad:
        raise ValueError(f"unknown memory tags {sorted(bad)}")
    return {"tags": list(tags)}


def register_worker_request(url: str) -> dict:
    """POST /workers on the router."""
    return {"url": url}


def abort_request() -> dict:
    """POST /abort_request."""
    return {"abort_all": True}


def weights_by_name_request(name: str, truncate: int = 100) -> dict:
    """GET /get_weights_by_name (JSON body)."""
    return {"name": name, "truncate_size": int(truncate)}


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
        reason = fr.get("type") if isinstance(fr, dict) else str(fr)
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


# ---------------------------------------------------------------------------- payloads


def split_by_dtype(bucket: Bucket) -> list[Bucket]:
    """Sub-buckets of one dtype each, in first-seen order (a flattened bucket has one dtype)."""
    groups: dict[torch.dtype, Bucket] = {}
    for name, t in bucket:
        groups.setdefault(t.dtype, []).append((name, t))
    return list(groups.values())


def flatten_bucket(bucket: Bucket, metadata_cls) -> dict:
    """``{"flattened_tensor": 1-D tensor, "metadata": [metadata_cls(...)]}`` as SGLang's
    ``FlattenedTensorBucket`` reconstructs it (``flat[start_idx:end_idx].reshape(shape)``).
    All tensors must share one dtype (``split_by_dtype``), so no element is converted."""
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket needs one dtype, got {sorted(map(str, dtypes))}")
    parts, meta, start = [], [], 0
    for name, t in bucket:
        flat = t.detach().contiguous().view(-1)
        parts.append(flat)
        meta.append(
            metadata_cls(
                name=name,
                shape=t.shape,
                dtype=t.dtype,
                start_idx=start,
                end_idx=start + flat.numel(),
                numel=flat.numel(),
            )
        )
        start += flat.numel()
    return {"flattened_tensor": torch.cat(parts), "metadata": meta}


def serialize_payload(obj: Any) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` wire format:
    base64 of a ForkingPickler dump (CUDA tensors travel as IPC handles)."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def sglang_metadata_cls():
    """SGLang's own metadata class: its unpickler accepts only torch, builtins and sglang.srt."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError as e:
        raise EngineError("colocated weight updates need the sglang package in the trainer's environment") from e
    return FlattenedTensorMetadata


# ---------------------------------------------------------------------------- client


class HTTPError(EngineError):
    def __init__(self, url: str, status: Optional[int], detail: str):
        super().__init__(f"{url}: {status or 'no response'}: {detail[:500]}")
        self.status = status


def call(url: str, body: Optional[dict] = None, *, method: Optional[str] = None, timeout: float = 60.0) -> Any:
    """Send one JSON request; returns the decoded JSON (or text). Raises ``HTTPError``."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise HTTPError(url, e.code, e.read().decode(errors="replace")) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise HTTPError(url, None, str(e)) from None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text


def wait_healthy(url: str, timeout_s: float, alive=lambda: True, path: str = "/health_generate") -> None:
    """Poll ``url + path`` until 200; ``alive()`` False (process died) fails at once."""
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        if not alive():
            raise EngineError(f"{url} exited before becoming healthy")
        try:
            call(url + path, timeout=10)
            return
        except HTTPError as e:
            last = str(e)
        time.sleep(1.0)
    raise EngineError(f"{url} not healthy after {timeout_s:.0f} s (last: {last})")
