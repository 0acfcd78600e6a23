"""Packed sequences -> the tensors Megatron's forward takes.

A micro-batch holds token-aligned tensors (ids, labels, loss mask, position ids and any extra
per-token fields) plus, for packed rows, each row's document boundaries ``cu_seqlens``. The
attention inputs are built only when the micro-batch runs (``attention_inputs``), on the
device, so no ``[L, L]`` mask is held per micro-batch in advance:

* Transformer Engine: packed rows go through THD attention with ``PackedSeqParams`` (one row
  per micro-batch; RoPE restarts at every document); plain rows pass no mask at all (TE's
  causal attention does not read one).
* torch-native layers (CPU, GPUs without TE): a block-diagonal causal mask per packed
  micro-batch, or for plain rows one causal mask per sequence length, shared by every
  micro-batch of that length. These layers rotate by the absolute offset in the row, which
  within a document differs from a restarted position by a constant shift: RoPE attention
  depends only on the relative offset, so the result is the same up to float rounding.

Under context parallel each rank takes its load-balanced share of every document
(``context_parallel_index``). ``BatchStream`` cuts a packed data set into each data-parallel
rank's micro-batches of consecutive global batches, from a resumable data position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_klear.data.sft import PackedSample
from megatron_klear.models.forward import causal_mask
from megatron_klear.training.run_state import DataPosition

ROW_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def document_ids(cu_seqlens: np.ndarray, length: int) -> np.ndarray:
    """Per-position document index from boundaries ``[0, ..., length]``."""
    ids = np.zeros(length, np.int64)
    for d, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        ids[a:b] = d
    return ids


def packed_attention_mask(cu_seqlens: np.ndarray, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, 1, L, L]`` bool mask on ``device``, True where attention is NOT allowed (Megatron's
    convention): causal, and never across a document boundary."""
    cu = torch.as_tensor(np.asarray(cu_seqlens), dtype=torch.long, device=device)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), cu[1:] - cu[:-1])
    if doc.numel() != length:
        raise ValueError(f"cu_seqlens cover {doc.numel()} positions, the row has {length}")
    same = doc[:, None] == doc[None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return ~(same & causal)[None, None]


def packed_seq_params(cu_seqlens: np.ndarray, device: Optional[torch.device | str] = None):
    """Transformer Engine THD parameters for one packed sequence (``cu_seqlens`` on ``device``,
    default: the GPU when there is one)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bounds = np.asarray(cu_seqlens, np.int32)
    max_len = int(np.diff(bounds).max())  # from the host copy: no device sync
    cu = torch.from_numpy(bounds).to(device)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


def attention_inputs(mb: dict, use_te: bool, device: torch.device | str, causal_masks: dict) -> dict:
    """The attention keyword arguments of the model's forward for micro-batch ``mb``, built now
    on ``device``: ``attention_mask`` and, for packed rows under Transformer Engine,
    ``packed_seq_params``. ``causal_masks`` caches the plain causal masks by length (at most
    one per shape); the caller decides how long it lives."""
    cu = mb.get("cu_seqlens")
    if use_te:
        if cu is None:
            return {"attention_mask": None}
        return {"attention_mask": None, "packed_seq_params": packed_seq_params(cu[0], device)}
    length = mb["input_ids"].shape[1]
    if cu is None:
        key = (length, str(device))
        if key not in causal_masks:
            causal_masks[key] = causal_mask(length, device)
        return {"attention_mask": causal_masks[key]}
    return {"attention_mask": torch.cat([packed_attention_mask(c, length, device) for c in cu])}


def context_parallel_index(cu_seqlens: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """Positions of a packed sequence that context-parallel rank ``cp_rank`` holds.

    Each document is cut into ``2 x cp_size`` equal chunks and rank r keeps chunks r and
    ``2 x cp_size - 1 - r``: with causal attention the early chunk is cheap and the late one
    expensive, so every rank does the same work. This is the layout Transformer Engine's
    context-parallel THD attention and Megatron's THD RoPE expect (with the global cu_seqlens).
    """
    parts = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if (b - a) % (2 * cp_size):
            raise ValueError(f"document [{a}, {b}) is not a multiple of 2 x cp = {2 * cp_size} long (pack aligned?)")
        chunk = (b - a) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(np.arange(a + c * chunk, a + (c + 1) * chunk))
    return np.concatenate(parts)


def micro_batch(samples: Sequence[PackedSample], use_te: bool = False, cp_size: int = 1, cp_rank: int = 0) -> dict:
    """Stack rows into one micro-batch (this rank's share of it under context parallel).

    Every row's token-aligned arrays (``extra`` included) are stacked; packed rows keep their
    global ``cu_seqlens`` (a list, one per row) for ``attention_inputs``.
    """
    packed = samples[0].cu_seqlens is not None
    if any((s.cu_seqlens is not None) != packed for s in samples):
        raise ValueError("a micro-batch mixes packed rows and plain rows")
    keys = ROW_KEYS + tuple(samples[0].extra)
    batch = {k: torch.from_numpy(np.stack([_field(s, k) for s in samples])) for k in keys}
    batch["cu_seqlens"] = [s.cu_seqlens for s in samples] if packed else None
    if use_te and packed and len(samples) != 1:
        raise ValueError("packed sequences with Transformer Engine need micro_batch_size=1")
    if cp_size > 1:
        if not use_te:
            raise ValueError("context parallel needs Transformer Engine's THD attention (use_te)")
        if not packed or len(samples) != 1:
            raise ValueError("context parallel needs one packed row per micro-batch")
        index = torch.from_numpy(context_parallel_index(samples[0].cu_seqlens, cp_size, cp_rank))
        for k in keys:
            batch[k] = batch[k][:, index]
    return batch


def _field(sample: PackedSample, key: str) -> np.ndarray:
    return getattr(sample, key) if key in ROW_KEYS else sample.extra[key]


@dataclass
class GlobalBatch:
    """This rank's share of one global batch."""

    micro: list  # this DP rank's micro-batches
    next: DataPosition  # where the next global batch starts
    lengths: list[np.ndarray]  # real document lengths of this rank's packs (padding excluded)


class BatchStream:
    """This DP rank's micro-batches of each global batch of a packed data set (``plan(epoch)``
    lists an epoch's packs, ``build(pack)`` makes one ``PackedSample``), from a resumable
    data position: ``seqs_per_batch`` packs per global batch, ``n_micro`` micro-batches of
    ``mbs`` packs per rank."""

    def __init__(
        self,
        dataset,
        seqs_per_batch: int,
        n_micro: int,
        mbs: int,
        dp_rank: int,
        use_te: bool,
        cp: tuple[int, int] = (1, 0),
    ):
        self.ds, self.seqs, self.n_micro, self.mbs = dataset, seqs_per_batch, n_micro, mbs
        self.dp_rank, self.use_te = dp_rank, use_te
        self.cp_size, self.cp_rank = cp  # the ranks of one context-parallel group share each sequence

    def global_batch(self, start: DataPosition) -> GlobalBatch:
        """The global batch starting at ``start``: this rank's micro-batches, the next position
        (an epoch that runs out continues in the next one) and this rank's document lengths."""
        positions = []
        e, k = start.epoch, start.index
        for _ in range(self.seqs):
            if k >= len(self.ds.plan(e)):
                e, k = e + 1, 0
            positions.append((e, k))
            k += 1
        share = self.n_micro * self.mbs
        mine = positions[self.dp_rank * share : (self.dp_rank + 1) * share]
        samples = [self.ds.build(self.ds.plan(pe)[pk]) for pe, pk in mine]
        micro = [
            micro_batch(samples[i : i + self.mbs], self.use_te, self.cp_size, self.cp_rank)
            for i in range(0, len(samples), self.mbs)
        ]
        if k >= len(self.ds.plan(e)):
            e, k = e + 1, 0
        return GlobalBatch(micro, DataPosition(e, k), [s.document_lengths() for s in samples])
