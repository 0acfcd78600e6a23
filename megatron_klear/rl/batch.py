"""Training tensors from kept groups: mini-batches, split over DP ranks into micro-batches.

A sequence is prompt + response. Position t predicts token t + 1, so the response tokens are
scored at positions [P - 1, P + R - 1) of their sequence. Two layouts:

* packed (``max_tokens``: the config's ``data.max_tokens_per_micro_batch``). The mini-batch's
  sequences are dealt to the DP ranks longest first, each to the rank holding the fewest
  tokens so far, so tokens per rank are balanced. Each rank puts its sequences into K
  micro-batches of at most ``max_tokens`` tokens, longest first into the least-filled one, so
  the micro-batches are balanced too. K is the same on every rank (Megatron's schedule runs
  the same number everywhere): the most any rank needs; a rank with fewer sequences than K
  gets empty micro-batches. A micro-batch is one row: its sequences back to back with their
  boundaries (``cu_seqlens``), position ids restarting at 0 for each, padded at the end to a
  multiple of ``pad_to``; attention never crosses a boundary (``training.batches``). A
  sequence longer than the budget gets a micro-batch of its own.
* padded (the fallback, ``max_tokens`` None): ``mbs`` sequences per micro-batch, each
  right-padded to the mini-batch's longest sequence (one shape for the whole mini-batch); the
  mini-batch is padded with empty sequences to a multiple of DP x ``mbs`` and cut into
  contiguous shares.

Every per-token field travels with its token in one typed micro-batch (``RLMicroBatch``, whose
class docstring says which fields are shifted by one token): the loss mask, the advantage and
correctness of its sequence, the engine's log-prob and the weight version that sampled the
token (later also the trainer's old log-prob, same layout), and the index of its sequence in
the micro-batch (``seq_ids``, for sequence-mean aggregation). A new per-token field is one
field of ``RLMicroBatch`` and one line of ``_packed_row``. The global normalisers (response tokens,
sequences, tokens of correct responses) are computed from the whole mini-batch before any
layout, identically on every rank, so the loss does not depend on where a sequence lands. A
sequence longer than the model's context (``max_seq_len``) is an error. Every rank computes the
whole plan (it is cheap and needs no communication) and builds only its own micro-batches.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from megatron_klear.data.sft import PackedSample, assemble_pack
from megatron_klear.errors import ConfigError
from megatron_klear.rl.rollout import Group, Sample
from megatron_klear.training.batches import MicroBatch, check_field, document_ids, stack_rows

PAD_TO = 8  # rows are padded to a multiple of this many tokens

# rank -> micro-batch -> indices of the mini-batch's sequences (rows of a padded micro-batch)
Plan = list[list[list[int]]]


@dataclass(kw_only=True)
class RLMicroBatch(MicroBatch):
    """An RL micro-batch: ``MicroBatch`` (ids, positions, shifted labels and loss mask; the loss
    mask is 1 exactly on the predictions of response tokens) and, per position:

    shifted by one token, like the labels (position t: the prediction of token t + 1):
      ``engine_lp``  the engine's log-prob of that token when it sampled it (0 elsewhere);
      ``old_lp``     the trainer's recomputation before the step's updates (``rl.update``; None
                     until then);
      ``ref_lp``     a reference policy's log-prob (None: GPPO uses no reference);
      ``versions``   the weight version that sampled that token (-1 where no sampled token is
                     predicted); older than ``policy_version``: stale (``stale``);
    one value per sequence, on each of its positions (padding is a sequence of its own):
      ``adv`` (group advantage), ``correct`` (1.0 / 0.0), ``seq_ids`` (its index in the micro-batch).
    """

    SHIFTED_FIELDS: ClassVar[tuple[str, ...]] = MicroBatch.SHIFTED_FIELDS + (
        "engine_lp",
        "old_lp",
        "ref_lp",
        "versions",
    )
    SEQUENCE_FIELDS: ClassVar[tuple[str, ...]] = ("adv", "correct", "seq_ids")
    INT_FIELDS: ClassVar[tuple[str, ...]] = MicroBatch.INT_FIELDS + ("versions", "seq_ids")

    engine_lp: torch.Tensor  # [b, s] float32, shifted
    versions: torch.Tensor  # [b, s] int64, shifted
    adv: torch.Tensor  # [b, s] float32, per sequence
    correct: torch.Tensor  # [b, s] float32, per sequence
    seq_ids: torch.Tensor  # [b, s] int64, per sequence, in [0, b * s)
    policy_version: int  # the weights trained at: steps trained before this one
    old_lp: Optional[torch.Tensor] = None  # [b, s] float32, shifted
    ref_lp: Optional[torch.Tensor] = None  # [b, s] float32, shifted

    def stale(self) -> torch.Tensor:
        """``[b, s]`` bool: the token was sampled by weights older than the policy trained at."""
        return (self.versions >= 0) & (self.versions < self.policy_version)

    def validate(self) -> None:
        """``MicroBatch.validate`` and RL's own contract; an ``AssertionError`` names the field."""
        super().validate()
        trained = self.loss_mask > 0
        v = self.versions
        check_field(bool(((v[trained] >= 0) & (v[trained] <= self.policy_version)).all()), "versions",
               f"of trained tokens must lie in [0, policy_version={self.policy_version}]")  # fmt: skip
        check_field(bool((v[~trained] == -1).all()), "versions", "must be -1 where no sampled token is predicted")
        for name in ("engine_lp", "old_lp", "ref_lp"):
            t = getattr(self, name)
            if t is not None:
                ok = bool((torch.isfinite(t[trained]) & (t[trained] <= 0)).all())
                check_field(ok, name, "must be finite log-probs (<= 0) on trained tokens")
        check_field(bool((self.engine_lp[~trained] == 0).all()), "engine_lp", "must be 0 where nothing is trained")
        ids = self.seq_ids.reshape(-1)
        check_field(bool((ids >= 0).all() and (ids < ids.numel()).all()), "seq_ids", "must lie in [0, b * s)")
        if self.cu_seqlens is not None and self.cp_size == 1:
            for row, cu in enumerate(self.cu_seqlens):
                docs = torch.as_tensor(document_ids(np.asarray(cu), self.shape[1]))
                first = self.seq_ids[row][torch.as_tensor(np.asarray(cu[:-1]), dtype=torch.long)]
                ok = torch.equal(self.seq_ids[row], first[docs]) and len(set(first.tolist())) == len(first)
                check_field(ok, "seq_ids", f"of row {row} do not number its documents (cu_seqlens)")
        for name in ("adv", "correct"):
            values = getattr(self, name).reshape(-1).double()
            hi = values.new_full((ids.numel(),), -torch.inf).scatter_reduce(0, ids, values, "amax")
            lo = values.new_full((ids.numel(),), torch.inf).scatter_reduce(0, ids, values, "amin")
            check_field(bool((hi[ids] == lo[ids]).all()), name, "is not constant within a sequence (seq_ids)")


@dataclass
class LayoutStats:
    """How one mini-batch was laid out over all DP ranks."""

    micro_batches: int  # per rank (the same on every rank)
    rank_tokens: list[int]  # sequence tokens (prompt + response) per DP rank
    positions: int  # positions of every rank's micro-batches, padding included

    @property
    def fill(self) -> float:
        """Share of the positions that hold sequence tokens (1.0: no padding)."""
        return sum(self.rank_tokens) / max(self.positions, 1)


@dataclass
class MiniBatch:
    micro: list[RLMicroBatch]  # this DP rank's micro-batches
    num_tokens: int  # response tokens in the whole mini-batch (all DP ranks)
    num_seqs: int  # sequences with at least one response token
    correct_tokens: int  # response tokens of correct responses
    num_groups: int
    # this rank's sequences: index in the mini-batch -> (micro-batch, row, first position)
    placement: dict[int, tuple[int, int, int]]
    layout: LayoutStats


def minibatches(
    groups: list[Group],
    mini_batch_prompts: int,
    dp: int,
    dp_rank: int,
    mbs: int = 1,
    *,
    max_tokens: Optional[int] = None,
    pad_to: int = PAD_TO,
    max_seq_len: Optional[int] = None,
    use_te: bool = False,
    policy_version: int = 0,
) -> list[MiniBatch]:
    """Split ``groups`` into mini-batches of ``mini_batch_prompts`` groups (the last may be
    smaller when dynamic sampling came up short) and build this rank's micro-batches: packed
    into ``max_tokens`` budgets, or ``mbs`` padded sequences each when it is None.
    ``policy_version``: the weight version trained at (steps trained before this one); a
    sample of an older version is stale."""
    out = []
    for start in range(0, len(groups), mini_batch_prompts):
        gs = groups[start : start + mini_batch_prompts]
        seqs = [s for g in gs for s in g if s.response_ids]
        if not seqs:
            continue
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in seqs]
        check_context(seqs, max_seq_len)
        if max_tokens is None:
            length = _round_up(max(lengths), pad_to)
            plan = padded_plan(len(seqs), dp, mbs)
            widths = [[mbs * length] * len(mine) for mine in plan]
        else:
            plan = packed_plan(lengths, dp, max_tokens)
            widths = [[_round_up(sum(lengths[i] for i in mb), pad_to) for mb in mine] for mine in plan]
        micro, placement = [], {}
        for k, members in enumerate(plan[dp_rank]):
            if max_tokens is None:
                rows = [_padded_row(seqs[i], length, j) for j, i in enumerate(members)]
                rows += [_padded_row(None, length, j) for j in range(len(members), mbs)]
                placement.update({i: (k, j, 0) for j, i in enumerate(members)})
            else:
                rows = [_packed_row([seqs[i] for i in members], widths[dp_rank][k])]
                starts = rows[0].cu_seqlens
                placement.update({i: (k, 0, int(starts[j])) for j, i in enumerate(members)})
            fields, cu = stack_rows(rows, use_te)
            micro.append(RLMicroBatch(**fields, cu_seqlens=cu, policy_version=policy_version))
        out.append(
            MiniBatch(
                micro=micro,
                num_tokens=sum(len(s.response_ids) for s in seqs),
                num_seqs=len(seqs),
                correct_tokens=sum(len(s.response_ids) for s in seqs if s.correct),
                num_groups=len(gs),
                placement=placement,
                layout=LayoutStats(
                    micro_batches=len(plan[0]),
                    rank_tokens=[sum(lengths[i] for mb in mine for i in mb) for mine in plan],
                    positions=sum(map(sum, widths)),
                ),
            )
        )
    return out


def check_context(seqs: Sequence[Sample], max_seq_len: Optional[int]) -> None:
    """A sequence longer than the model's context cannot be trained on: say which and why."""
    if max_seq_len is None:
        return
    for s in seqs:
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p + r > max_seq_len:
            raise ConfigError(
                f"a sequence of {p + r} tokens (prompt {p} + response {r}) exceeds the model's context "
                f"max_position_embeddings={max_seq_len}: lower rollout.max_prompt_len + rollout.max_response_len"
            )


def padded_plan(n: int, dp: int, mbs: int) -> Plan:
    """Contiguous shares of ``n`` sequences (padded with empty rows to a multiple of DP x
    ``mbs``), cut into micro-batches of ``mbs`` rows."""
    per_rank = _round_up(n, dp * mbs) // dp
    plan = []
    for r in range(dp):
        mine = list(range(r * per_rank, min((r + 1) * per_rank, n)))
        plan.append([mine[k : k + mbs] for k in range(0, per_rank, mbs)])
    return plan


def packed_plan(lengths: Sequence[int], dp: int, budget: int) -> Plan:
    """Balanced ranks, then the same number of balanced micro-batches of at most ``budget``
    tokens on every rank (see the module docstring)."""
    ranks = balance_ranks(lengths, dp)
    k = max(len(first_fit(lengths, mine, budget)) for mine in ranks)
    plan = []
    for mine in ranks:
        bins = spread(lengths, mine, k, budget)
        if bins is None:  # the balanced split does not fit: first fit, then empty micro-batches
            bins = first_fit(lengths, mine, budget)
            bins += [[] for _ in range(k - len(bins))]
        plan.append(sorted(bins, key=lambda b: -sum(lengths[i] for i in b)))  # biggest first
    return plan


def balance_ranks(lengths: Sequence[int], dp: int) -> list[list[int]]:
    """Sequence indices per DP rank: longest first, each to the rank with the fewest tokens
    (then the fewest sequences, then the lowest rank)."""
    heap = [(0, 0, r) for r in range(dp)]
    ranks: list[list[int]] = [[] for _ in range(dp)]
    for i in _longest_first(lengths, range(len(lengths))):
        tokens, count, r = heapq.heappop(heap)
        ranks[r].append(i)
        heapq.heappush(heap, (tokens + lengths[i], count + 1, r))
    return ranks


def first_fit(lengths: Sequence[int], indices: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing into bins of at most ``budget`` tokens (as few as it finds); a
    sequence longer than the budget gets a bin of its own."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in _longest_first(lengths, indices):
        b = next((b for b, load in enumerate(loads) if load + lengths[i] <= budget), None)
        if b is None:
            bins.append([])
            loads.append(0)
            b = len(bins) - 1
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins


def spread(lengths: Sequence[int], indices: Sequence[int], k: int, budget: int) -> Optional[list[list[int]]]:
    """``indices`` in exactly ``k`` bins, longest first into the least-filled bin; None when a
    sequence would take a bin past ``budget`` (one longer than the budget may take an empty bin)."""
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in _longest_first(lengths, indices):
        load, b = heapq.heappop(heap)
        if load and load + lengths[i] > budget:
            return None  # every other bin is at least as full
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def _longest_first(lengths: Sequence[int], indices: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (-lengths[i], i))


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _packed_row(samples: Sequence[Sample], length: int, first_id: int = 0) -> PackedSample:
    """Sequences back to back in one row of ``length`` positions, with their per-token fields.
    ``seq_ids`` numbers the row's documents (padding included) from ``first_id``."""
    docs = []
    for s in samples:
        target = np.zeros(len(s.prompt_ids) + len(s.response_ids), np.float32)
        target[len(s.prompt_ids) :] = 1.0  # the response tokens are the ones predicted
        docs.append((np.asarray(s.prompt_ids + s.response_ids, np.int64), target))
    row = assemble_pack(docs, length)
    eng, adv, correct = (np.zeros(length, np.float32) for _ in range(3))
    versions = np.full(length, -1, np.int64)
    for s, a in zip(samples, row.cu_seqlens[:-1].tolist()):
        p, r = len(s.prompt_ids), len(s.response_ids)
        eng[a + p - 1 : a + p + r - 1] = s.engine_logprobs  # shifted: the prediction of each response token
        versions[a + p - 1 : a + p + r - 1] = s.weight_version
        adv[a : a + p + r] = s.advantage  # per sequence
        correct[a : a + p + r] = float(s.correct)
    seq_ids = document_ids(row.cu_seqlens, length) + first_id
    row.extra = dict(engine_lp=eng, versions=versions, adv=adv, correct=correct, seq_ids=seq_ids)
    return row


def _padded_row(sample: Optional[Sample], length: int, row: int) -> PackedSample:
    """One sequence (or none) right-padded to ``length``: a plain row (causal attention).
    Row ``row`` numbers its sequence 2 x row and its padding 2 x row + 1 (unique per micro-batch)."""
    out = _packed_row([] if sample is None else [sample], length, first_id=2 * row)
    out.cu_seqlens = None
    return out


def layout_metrics(minis: Sequence[MiniBatch]) -> dict[str, float]:
    """A step's ``pack/*`` metrics: the fill (sequence tokens / positions, over all mini-batches
    and ranks), and per mini-batch (averaged over the step's mini-batches) the micro-batches per
    rank and the most and the mean sequence tokens a DP rank holds (all 0 without an update)."""
    n = max(len(minis), 1)
    stats = [m.layout for m in minis]
    return {
        "pack/fill": sum(sum(s.rank_tokens) for s in stats) / max(sum(s.positions for s in stats), 1),
        "pack/micro_batches_per_rank": sum(s.micro_batches for s in stats) / n,
        "pack/rank_tokens_max": sum(max(s.rank_tokens) for s in stats) / n,
        "pack/rank_tokens_mean": sum(sum(s.rank_tokens) / len(s.rank_tokens) for s in stats) / n,
    }
