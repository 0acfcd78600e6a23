"""Push the trainer's weights into an inference engine, and check that it took.

``sync_weights`` is collective over every trainer rank: data-parallel replica 0 gathers HF
buckets (``gather_hf_buckets``), global rank 0 feeds them to the engine, and all ranks learn
the outcome together. A colocated SGLang engine is fed from every rank instead
(``sync.colocated``: each GPU's own copy, CUDA IPC). A failing engine never leaves the other
ranks stuck in a gather: the buckets are drained, then every rank raises ``SyncError`` and the
engine stays stale.

``probe_logprob_diff`` is the check that a sync took effect (SGLang cannot read Qwen3 weights
back): the engine samples several continuations of a fixed probe at the rollout temperature,
and the mean absolute difference between its log-probs of all their tokens and the trainer's
at the same temperature must stay under a limit. Sampled-token log-probs are compared because
SGLang's input-token log-probs ignore the temperature. A mean over many tokens is steady (one
unlikely token in one short sample moves it little), and a probe over the limit is taken once
more with other seeds before the sync is declared failed: noise does not stop a run, weights
that did not arrive still do (they fail every probe by far).

``resume_engine_memory`` takes a colocated engine's memory back only after every trainer rank
returned its cached CUDA memory to the driver, the sync's own buckets included;
``sync_into_engine`` is the sync as the RL loop runs it, with that memory handling around it.
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
    sequences: int = 4,
) -> float:
    """Collective: the engine (on global rank 0) samples ``sequences`` continuations of
    ``new_tokens`` tokens after ``probe`` at ``temperature``; returns, on every rank, the mean
    |trainer - engine| log-prob over all their tokens at that temperature. Above ``max_diff``
    the probe is taken once more with other seeds; above it again, every rank raises
    ``SyncError`` naming both: the engine does not hold the trainer's weights (a sync that
    silently did not take effect)."""
    diff = _probe_once(engine, model, cfg, probe, temperature, new_tokens, seed, sequences)
    if max_diff is None or diff <= max_diff:
        return diff
    again = _probe_once(engine, model, cfg, probe, temperature, new_tokens, seed + 7919, sequences)
    if again <= max_diff:
        if engine is not None:
            print(f"[sync] probe {diff:.4g} > rollout.max_logprob_diff={max_diff}; re-probe {again:.4g}: passed",
                  flush=True)  # fmt: skip
        return again
    raise SyncError(
        f"engine vs trainer log-prob difference on the probe is {diff:.4g}, and {again:.4g} on a re-probe, "
        f"> rollout.max_logprob_diff={max_diff} (mean over {sequences} x {new_tokens} sampled tokens): the engine "
        "does not hold the trainer's weights"
    )


def _probe_once(
    engine: Optional[InferenceEngine],
    model: torch.nn.Module,
    cfg: Qwen3Config,
    probe: list[int],
    temperature: float,
    new_tokens: int,
    seed: int,
    sequences: int,
) -> float:
    """Collective: one probe (``probe_logprob_diff``): the mean |diff| over every sampled token."""
    samples = None
    if engine is not None:
        params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, n=sequences, seed=seed,
                                ignore_eos=True)  # fmt: skip
        [group] = engine.generate([probe], params)
        samples = [(list(probe) + c.output_ids, c.logprobs) for c in group]
    samples = broadcast_object(samples)
    total, count = 0.0, 0
    for seq, theirs in samples:
        # greedy samples come with log-probs at temperature 1 (SGLang's convention, and ours)
        ours = trainer_logprobs(model, cfg, seq, temperature if temperature >= 1e-6 else 1.0)
        if ours is not None:
            got = ours[len(probe) - 1 :]
            total += float((got - torch.tensor(theirs, dtype=torch.float64)).abs().sum())
            count += len(got)
    diff = total / count if count else 0.0
    return broadcast_object(diff if engine is not None else None)


def sync_into_engine(
    engine: Optional[InferenceEngine],
    model: torch.nn.Module,
    cfg: Qwen3Config,
    version: str,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    released: bool = False,
) -> SyncStats:
    """Collective: ``sync_weights``; for an engine whose memory was released around training
    (``released``, rollout.release_memory) its weights come back first, and its KV cache and CUDA
    graphs only after the sync, once every rank freed its cached CUDA memory again: the sync's
    buckets sit in that cache, and the engine taking its KV cache back beside them risks an OOM."""
    if released:
        resume_engine_memory(engine, ("weights",))
    stats = sync_weights(engine, model, cfg, version, bucket_bytes)
    if released:
        resume_engine_memory(engine, ("kv_cache", "cuda_graph"))
    return stats


def resume_engine_memory(engine: Optional[InferenceEngine], tags: tuple[str, ...]) -> None:
    """Collective: every rank returns its cached CUDA memory to the driver (``free_trainer_cache``),
    then the engine (global rank 0's) takes back ``tags``. Before the weights come back, and
    again before the KV cache and CUDA graphs: the sync's buckets were cached in between."""
    free_trainer_cache()
    if engine is not None:
        engine.resume_memory(tags)


def free_trainer_cache() -> None:
    """Collective: return the trainer's cached CUDA memory to the driver on every rank, then
    wait for all, so that a colocated engine can take its memory back."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
