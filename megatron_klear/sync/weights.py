"""Push the trainer's weights into an inference engine, and check that it took.

``sync_weights`` is collective over every trainer rank: data-parallel replica 0 gathers HF
buckets (``gather_hf_buckets``), global rank 0 feeds them to the engine, and all ranks learn
the outcome together. A colocated SGLang engine is fed from every rank instead
(``sync.colocated``: each GPU's own copy, CUDA IPC). A failing engine never leaves the other
ranks stuck in a gather: the buckets are drained, then every rank raises ``SyncError`` and the
engine stays stale.

``probe_logprob_diff`` is the check that a sync took effect (SGLang cannot read Qwen3 weights
back): the engine samples a continuation of a fixed probe at the rollout temperature, and the
mean absolute difference between its log-probs of those tokens and the trainer's at the same
temperature must stay under a limit. Sampled-token log-probs are compared because SGLang's
input-token log-probs ignore the temperature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_klear.distributed import broadcast_object
from megatron_klear.errors import EngineError, SyncError
from megatron_klear.inference.base import InferenceEngine, SamplingParams
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.forward import forward_logits, send_to_rank0
from megatron_klear.sync.colocated import sync_colocated
from megatron_klear.sync.gather import DEFAULT_BUCKET_BYTES, gather_hf_buckets, gather_participant


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
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and engine is None:
        raise AssertionError("global rank 0 must hold the engine")
    t0 = time.time()
    targets = getattr(engine, "colocated_targets", lambda: None)() if rank0 else None
    if dist.is_initialized():
        targets = broadcast_object(targets)
    if targets is not None:
        error, nbytes, nbuckets, ntensors = sync_colocated(engine, targets, model, cfg, version, bucket_bytes)
        if error is not None:
            raise SyncError(f"weight sync {version} failed, engine left stale: {error}")
        return SyncStats(time.time() - t0, nbytes, nbuckets, ntensors)
    error: Optional[str] = None
    nbytes = nbuckets = ntensors = 0
    if rank0:
        try:
            engine.begin_update(version)
        except EngineError as e:
            error = f"begin_update: {e}"
    if gather_participant(cfg):
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
    """Collective: log p(ids[t] | ids[<t]) for t >= 1 under the trainer, on global rank 0
    (only the real tokens: ``forward_logits`` pads the sequence for sequence parallel and
    returns the real positions)."""

    logits = send_to_rank0(forward_logits(model, torch.tensor([ids]), cfg.vocab_size))
    model.train()
    if logits is None:
        return None
    lp = (logits[0, :-1].cpu().double() / temperature).log_softmax(-1)  # on the GPU when rank 0 holds it
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def probe_logprob_diff(
    engine: Optional[InferenceEngine],
    model: torch.nn.Module,
    cfg: Qwen3Config,
    probe: list[int],
    temperature: float = 1.0,
    new_tokens: int = 16,
    seed: int = 0,
    max_diff: Optional[float] = None,
) -> float:
    """Collective: the engine (on global rank 0) samples ``new_tokens`` after ``probe`` at
    ``temperature``; returns, on every rank, the mean |trainer - engine| log-prob of those
    tokens at that temperature. Above ``max_diff`` every rank raises ``SyncError``: the
    engine does not hold the trainer's weights (a sync that silently did not take effect)."""
    seq = theirs = None
    if engine is not None:
        params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, seed=seed, ignore_eos=True)
        [[c]] = engine.generate([probe], params)
        seq, theirs = list(probe) + c.output_ids, c.logprobs
    seq = broadcast_object(seq)
    # greedy samples come with log-probs at temperature 1 (SGLang's convention, and ours)
    ours = trainer_logprobs(model, cfg, seq, temperature if temperature >= 1e-6 else 1.0)
    diff = None
    if ours is not None:
        got = ours[len(probe) - 1 :]
        diff = float((got - torch.tensor(theirs, dtype=torch.float64)).abs().mean()) if len(got) else 0.0
    diff = broadcast_object(diff)
    if max_diff is not None and not diff <= max_diff:
        raise SyncError(
            f"engine vs trainer log-prob difference on the probe is {diff:.4g} > rollout.max_logprob_diff="
            f"{max_diff}: the engine does not hold the trainer's weights"
        )
    return diff


def free_trainer_cache() -> None:
    """Collective: return the trainer's cached CUDA memory to the driver on every rank, then
    wait for all, so that a colocated engine can take its memory back."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
