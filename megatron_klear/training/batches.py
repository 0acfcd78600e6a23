"""Packed sequences -> the tensors Megatron's forward takes.

Document boundaries are enforced in attention either by a block-diagonal causal mask (the
torch-native layers: CPU and GPUs without Transformer Engine) or by ``PackedSeqParams``
with ``cu_seqlens`` (Transformer Engine's THD attention, micro-batch size 1). Under context
parallel each rank takes its load-balanced share of every document (``context_parallel_index``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_klear.data.sft import PackedSample


def document_ids(cu_seqlens: np.ndarray, length: int) -> np.ndarray:
    """Per-position document index from boundaries ``[0, ..., length]``."""
    ids = np.zeros(length, np.int64)
    for d, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        ids[a:b] = d
    return ids


def packed_attention_mask(cu_seqlens: np.ndarray, length: int) -> torch.Tensor:
    """``[1, 1, L, L]`` bool mask, True where attention is NOT allowed (Megatron's convention):
    causal, and never across a document boundary."""
    doc = torch.from_numpy(document_ids(cu_seqlens, length))
    same = doc[:, None] == doc[None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ~(same & causal)[None, None]


def packed_seq_params(cu_seqlens: np.ndarray):
    """Transformer Engine THD parameters for one packed sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32)
    if torch.cuda.is_available():
        cu = cu.cuda()
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


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
    """Stack packed samples into one micro-batch (this rank's share of it under context parallel)."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([s.input_ids for s in samples])),
        "labels": torch.from_numpy(np.stack([s.labels for s in samples])),
        "loss_mask": torch.from_numpy(np.stack([s.loss_mask for s in samples])),
        "position_ids": torch.from_numpy(np.stack([s.position_ids for s in samples])),
    }
    L = batch["input_ids"].shape[1]
    if use_te:
        if len(samples) != 1:
            raise ValueError("packed sequences with Transformer Engine need micro_batch_size=1")
        batch["packed_seq_params"] = packed_seq_params(samples[0].cu_seqlens)  # global boundaries, also under CP
        batch["attention_mask"] = None
        if cp_size > 1:
            index = torch.from_numpy(context_parallel_index(samples[0].cu_seqlens, cp_size, cp_rank))
            for k in ("input_ids", "labels", "loss_mask", "position_ids"):
                batch[k] = batch[k][:, index]
    elif cp_size > 1:
        raise ValueError("context parallel needs Transformer Engine's THD attention (use_te)")
    else:
        batch["attention_mask"] = torch.cat([packed_attention_mask(s.cu_seqlens, L) for s in samples])
    return batch
