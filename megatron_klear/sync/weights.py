"""Push the trainer's weights into an inference engine, and check that it took.

``sync_weights`` is collective over every trainer rank: data-parallel replica 0 gathers HF
buckets (``gather_hf_buckets``), global rank 0 feeds them to the engine, and all ranks learn
the outcome together. A failing engine never leaves the other ranks stuck in a gather: rank 0
keeps draining the buckets, then every rank raises ``SyncError`` and the engine stays stale.

``probe_logprob_diff`` is the train/inference consistency check: the mean absolute difference
between the trainer's and the engine's log-probs of a fixed probe sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_klear.distributed import broadcast_object
from megatron_klear.errors import EngineError, SyncError
from megatron_klear.inference.base import InferenceEngine
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.forward import forward_logits, send_to_rank0
from megatron_klear.sync.gather import DEFAULT_BUCKET_BYTES, gather_hf_buckets


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    buckets: int
    tensors: int


def sync_weights(
    engine: Optional[InferenceEngine],
    model: torch.nn.Module,
    cfg: Qwen3Config,
    version: str,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> SyncStats:
    """Collective: send the model's full HF weights to ``engine`` (held by global rank 0)."""
    from megatron.core import parallel_state as ps

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and engine is None:
        raise ValueError("global rank 0 must hold the engine")
    t0 = time.time()
    error: Optional[str] = None
    nbytes = nbuckets = ntensors = 0
    if rank0:
        try:
            engine.begin_update(version)
        except EngineError as e:
            error = f"begin_update: {e}"
    if ps.get_data_parallel_rank() == 0:
        for bucket in gather_hf_buckets(model, cfg, bucket_bytes):
            nbuckets += 1
            ntensors += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if error is None:
                try:
                    engine.update_bucket(bucket)
                except EngineError as e:
                    error = str(e)  # keep draining: the other ranks are inside the gather
    if rank0 and error is None:
        try:
            engine.finish_update()
        except EngineError as e:
            error = str(e)
    error = broadcast_object(error)  # rank 0's verdict on every rank
    if error is not None:
        raise SyncError(f"weight sync {version} failed, engine left stale: {error}")
    return SyncStats(time.time() - t0, nbytes, nbuckets, ntensors)


def trainer_logprobs(model: torch.nn.Module, cfg: Qwen3Config, ids: list[int], temperature: float = 1.0):
    """Collective: log p(ids[t] | ids[<t]) for t >= 1 under the trainer, on global rank 0."""

    logits = send_to_rank0(forward_logits(model, torch.tensor([ids]), cfg.vocab_size))
    model.train()
    if logits is None:
        return None
    lp = (logits[0, :-1].double() / temperature).log_softmax(-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def probe_logprob_diff(
    engine: Optional[InferenceEngine], model: torch.nn.Module, cfg: Qwen3Config, probe: list[int]
) -> float:
    """Collective: mean |trainer - engine| log-prob over the probe's tokens, on every rank."""
    ours = trainer_logprobs(model, cfg, probe)
    diff = None
    if ours is not None:
        theirs = torch.tensor(engine.score([probe])[0], dtype=torch.float64)
        diff = float((ours - theirs).abs().mean())
    return broadcast_object(diff)
