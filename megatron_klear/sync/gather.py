"""Full HF-named weights from a Megatron model at any TP x PP (x EP), in size-bounded buckets.

The buckets come out on global rank 0 (``gather_hf_buckets``), or, with pipeline parallelism
1, on every rank at once (``local_hf_buckets``, for colocated engines that read each GPU's own
copy). Each pipeline stage gathers its tensors over TP (``models.weights.iter_hf_weights``, the
same mapping as conversion: QKV and gate/up split, vocabulary padding removed, tied
embeddings once) and the stage's first rank sends them to rank 0 one at a time, so no rank
ever holds more than one bucket beyond its own shard of the model. Qwen3-MoE experts come to
the stage's first rank from their expert-parallel owners, one expert tensor at a time, in
global expert order. The ranks of the first data-parallel replica do the dense part, those of
the first expert-data-parallel replica the experts; with expert parallelism the two sets differ
(the EP group spans data-parallel ranks).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_klear.distributed import comm_device
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.weights import iter_hf_weights

DEFAULT_BUCKET_BYTES = 512 * 2**20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stage_tensors(model: torch.nn.Module, cfg: Qwen3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's full HF tensors, delivered on global rank 0 (collective over the stage)."""
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    # the stage's first rank: TP, CP and DP rank 0 (and so expert TP, EP, expert-DP rank 0)
    lead = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [dist.get_rank()]
    dev = comm_device()
    for stage in range(pp):
        if pp_rank == stage:  # collective over this stage's TP (and EP, ETP) groups
            items = iter_hf_weights(model, cfg, every_replica=False)
        else:
            items = iter(())
        if stage == 0:  # already on the first stage: its lead (global rank 0) has them
            if pp_rank == 0 and lead:
                yield from items
            else:
                for _ in items:  # take part in the gathers
                    pass
            continue
        # stage > 0: its lead sends each tensor to the first stage's lead
        if not lead:
            for _ in items:
                pass
            continue
        src, dst = ranks[stage], ranks[0]
        if pp_rank == stage:
            for name, t in items:
                dist.send_object_list([(name, tuple(t.shape), t.dtype)], dst=dst)
                dist.send(t.contiguous().to(dev), dst=dst)
            dist.send_object_list([None], dst=dst)
        elif pp_rank == 0:
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=src)
                if meta[0] is None:
                    break
                name, shape, dtype = meta[0]
                buf = torch.empty(shape, dtype=dtype, device=dev)
                dist.recv(buf, src=src)
                yield name, buf


def bucketed(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` items into lists of at most ``bucket_bytes`` each (a single
    larger tensor forms its own bucket), in order."""
    if bucket_bytes <= 0:
        raise ConfigError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in items:
        if bucket and size + _nbytes(t) > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += _nbytes(t)
    if bucket:
        yield bucket


def gather_participant(cfg: Qwen3Config) -> bool:
    """Whether this rank takes part in ``gather_hf_buckets``: it is in the first data-parallel
    replica, or, for Qwen3-MoE, in the first expert-data-parallel replica."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() == 0:
        return True
    return cfg.moe is not None and ps.get_expert_data_parallel_rank() == 0


def gather_hf_buckets(
    model: torch.nn.Module, cfg: Qwen3Config, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of ``(hf_name, tensor)`` of at most ``bucket_bytes`` each (a single larger
    tensor forms its own bucket) on global rank 0; nothing elsewhere.

    Collective: every rank where ``gather_participant`` holds must iterate it to the end (the
    others may too: they take part in nothing).
    """
    on_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    items = _stage_tensors(model, cfg)
    if not on_rank0:
        for _ in items:  # take part in the gathers
            pass
        return
    yield from bucketed(items, bucket_bytes)


def local_hf_buckets(
    model: torch.nn.Module, cfg: Qwen3Config, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The same buckets as ``gather_hf_buckets``, on every rank at once, each on the rank's own
    device (the TP all-gather leaves every TP rank with full tensors). Pipeline parallelism
    1 only: with PP > 1 a rank holds only its stage's tensors.

    Collective: every rank must iterate it to the end (each DP replica gathers over its own
    TP group).
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ConfigError("local_hf_buckets needs pipeline parallelism 1")
    yield from bucketed(iter_hf_weights(model, cfg), bucket_bytes)
