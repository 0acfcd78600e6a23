"""Packed sequences -> the tensors Megatron's forward takes.

A micro-batch (``MicroBatch``, typed; RL extends it with its per-token fields) holds ``[b, s]``
tensors whose shape contract (which fields are shifted by one token) is written once, on the
class, and checked by ``validate`` (in the tests and in debug mode), plus, for packed rows, each
row's document boundaries ``cu_seqlens``. The attention inputs are built only when the
micro-batch runs (``attention_inputs``), on the device, so no ``[L, L]`` mask is held per
micro-batch in advance:

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

from dataclasses import dataclass, fields, replace
from typing import ClassVar, Optional, Sequence, TypeVar

import numpy as np
import torch

from megatron_klear.data.sft import PackedSample
from megatron_klear.errors import ConfigError
from megatron_klear.models.forward import causal_mask
from megatron_klear.training.run_state import DataPosition

ROW_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")
_MB = TypeVar("_MB", bound="MicroBatch")


def check_field(ok: bool, name: str, what: str) -> None:
    """Part of a micro-batch's shape contract: an ``AssertionError`` naming the field unless ``ok``."""
    if not ok:
        raise AssertionError(f"micro-batch field {name}: {what}")


@dataclass
class MicroBatch:
    """One micro-batch: ``b`` rows of ``s`` positions (this rank's share under context parallel).

    The shape contract (``validate``):

    * every per-token field is a ``[b, s]`` tensor;
    * ``TOKEN_FIELDS`` belong to the token at their position: ``input_ids``, ``position_ids``
      (restarting at 0 for every document);
    * ``SHIFTED_FIELDS`` are shifted by one token: position t holds what belongs to the
      prediction of token t + 1 of the same document: ``labels`` (that token) and ``loss_mask``
      (1 where it is trained on). A document's last position predicts nothing (label 0, mask 0);
    * ``SEQUENCE_FIELDS`` hold one value per sequence on each of its positions (none here).

    ``cu_seqlens``: per row, the document boundaries of a packed row in the whole row's
    positions (before a context-parallel split), or None for plain rows (one sequence,
    right-padded, causal attention). ``cp_size`` > 1: the rows are a context-parallel share.
    """

    TOKEN_FIELDS: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids")
    SHIFTED_FIELDS: ClassVar[tuple[str, ...]] = ("labels", "loss_mask")
    SEQUENCE_FIELDS: ClassVar[tuple[str, ...]] = ()
    INT_FIELDS: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids", "labels")

    input_ids: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, shifted
    loss_mask: torch.Tensor  # [b, s] float, shifted: 1 where the label is trained on
    cu_seqlens: Optional[list[np.ndarray]] = None
    cp_size: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(b, s)``: rows and positions."""
        return tuple(self.input_ids.shape)

    @classmethod
    def per_token_fields(cls) -> tuple[str, ...]:
        return cls.TOKEN_FIELDS + cls.SHIFTED_FIELDS + cls.SEQUENCE_FIELDS

    def to(self: _MB, device: torch.device | str) -> _MB:
        """The micro-batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def validate(self) -> None:
        """Check the shape contract (class docstring); an ``AssertionError`` names the field.
        Reads the tensors on the host: for the tests and debug mode (``megatron_klear.debug``)."""
        shape = self.shape
        for name in self.per_token_fields():
            t = getattr(self, name)
            if t is None:  # an optional field not filled in yet
                continue
            check_field(
                isinstance(t, torch.Tensor) and tuple(t.shape) == shape, name, f"must be a {list(shape)} tensor"
            )
            integer = not torch.is_floating_point(t)
            check_field(integer == (name in self.INT_FIELDS), name, f"has dtype {t.dtype}")
        check_field(
            bool(((self.loss_mask == 0) | (self.loss_mask == 1)).all()), "loss_mask", "holds values other than 0, 1"
        )
        self._check_boundaries()
        self._check_shift()

    def _check_boundaries(self) -> None:
        b, s = self.shape
        if self.cp_size == 1:
            check_field(bool((self.position_ids[:, 0] == 0).all()), "position_ids", "must start every row at 0")
        if self.cu_seqlens is None:
            return
        check_field(len(self.cu_seqlens) == b, "cu_seqlens", f"needs one entry per row ({b})")
        for row, cu in enumerate(self.cu_seqlens):
            cu = np.asarray(cu)
            ok = cu[0] == 0 and cu[-1] == s * self.cp_size and bool(np.all(np.diff(cu) > 0))
            check_field(ok, "cu_seqlens", f"{cu.tolist()} must rise from 0 to {s * self.cp_size}")
            if self.cp_size == 1:  # positions restart at every boundary
                starts = torch.zeros(s, dtype=torch.bool)
                starts[torch.as_tensor(cu[:-1], dtype=torch.long)] = True
                restart = bool((self.position_ids[row][starts] == 0).all())
                check_field(restart, "position_ids", f"of row {row} do not restart at cu_seqlens")

    def _check_shift(self) -> None:
        """Labels are the next token of the same document; nothing is predicted across a
        document's end (checked where the next position follows in the same document)."""
        pos, ids, labels, mask = self.position_ids, self.input_ids, self.labels, self.loss_mask
        same_doc = pos[:, 1:] == pos[:, :-1] + 1
        check_field(bool((labels[:, :-1] == ids[:, 1:])[same_doc].all()), "labels", "are not input_ids shifted by one")
        if self.cp_size == 1:  # a share's chunks end inside documents: only whole rows end them
            ends = torch.cat([~same_doc, torch.ones_like(same_doc[:, :1])], dim=1)
            check_field(bool((mask[ends] == 0).all()), "loss_mask", "trains a document's last position")
            check_field(bool((labels[ends] == 0).all()), "labels", "predict across a document's end")


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
        raise AssertionError(f"cu_seqlens cover {doc.numel()} positions, the row has {length}")
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


def attention_inputs(mb: MicroBatch, use_te: bool, device: torch.device | str, causal_masks: dict) -> dict:
    """The attention keyword arguments of the model's forward for micro-batch ``mb``, built now
    on ``device``: ``attention_mask`` and, for packed rows under Transformer Engine,
    ``packed_seq_params``. ``causal_masks`` caches the plain causal masks by length (at most
    one per shape); the caller decides how long it lives."""
    cu = mb.cu_seqlens
    if use_te:
        if cu is None:
            return {"attention_mask": None}
        return {"attention_mask": None, "packed_seq_params": packed_seq_params(cu[0], device)}
    length = mb.shape[1]
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
            raise ConfigError(f"document [{a}, {b}) is not a multiple of 2 x cp = {2 * cp_size} long (pack aligned?)")
        chunk = (b - a) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(np.arange(a + c * chunk, a + (c + 1) * chunk))
    return np.concatenate(parts)


def stack_rows(
    samples: Sequence[PackedSample], use_te: bool = False, cp_size: int = 1, cp_rank: int = 0
) -> tuple[dict[str, torch.Tensor], Optional[list[np.ndarray]]]:
    """Every row's per-token arrays (``extra`` included) stacked into ``[b, s]`` tensors (this
    rank's share under context parallel), and the rows' global ``cu_seqlens`` (None: plain rows).
    Layouts the attention cannot run are ``ConfigError``s naming the setting."""
    packed = samples[0].cu_seqlens is not None
    if any((s.cu_seqlens is not None) != packed for s in samples):
        raise AssertionError("a micro-batch mixes packed rows and plain rows")
    keys = ROW_KEYS + tuple(samples[0].extra)
    batch = {k: torch.from_numpy(np.stack([_field(s, k) for s in samples])) for k in keys}
    if use_te and packed and len(samples) != 1:
        raise ConfigError("packed sequences with Transformer Engine need micro_batch_size=1")
    if cp_size > 1:
        if not use_te:
            raise ConfigError("context parallel needs Transformer Engine's THD attention (use_te)")
        if not packed or len(samples) != 1:
            raise ConfigError("context parallel needs one packed row per micro-batch")
        index = torch.from_numpy(context_parallel_index(samples[0].cu_seqlens, cp_size, cp_rank))
        batch = {k: v[:, index] for k, v in batch.items()}
    return batch, ([s.cu_seqlens for s in samples] if packed else None)


def micro_batch(
    samples: Sequence[PackedSample], use_te: bool = False, cp_size: int = 1, cp_rank: int = 0
) -> MicroBatch:
    """Stack rows into one micro-batch (this rank's share of it under context parallel)."""
    batch, cu = stack_rows(samples, use_te, cp_size, cp_rank)
    return MicroBatch(**{k: batch[k] for k in ROW_KEYS}, cu_seqlens=cu, cp_size=cp_size)


def _field(sample: PackedSample, key: str) -> np.ndarray:
    return getattr(sample, key) if key in ROW_KEYS else sample.extra[key]


@dataclass
class GlobalBatch:
    """This rank's share of one global batch."""

    micro: list[MicroBatch]  # this DP rank's micro-batches
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
