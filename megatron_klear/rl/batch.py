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

Every per-token field travels with its token: the loss mask, the advantage, correctness and
staleness (a kept surplus group's sample) of its sequence, the engine's log-prob (later also
the trainer's old log-prob, same layout), and the index of its sequence in the micro-batch
(``seq_ids``, for sequence-mean aggregation). The global normalisers (response tokens,
sequences, tokens of correct responses) are computed from the whole mini-batch before any
layout, identically on every rank, so the loss does not depend on where a sequence lands. A
sequence longer than the model's context (``max_seq_len``) is an error. Every rank computes the
whole plan (it is cheap and needs no communication) and builds only its own micro-batches.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_klear.data.sft import PackedSample, assemble_pack
from megatron_klear.errors import ConfigError
from megatron_klear.rl.rollout import Group, Sample
from megatron_klear.training.batches import document_ids, micro_batch

PAD_TO = 8  # rows are padded to a multiple of this many tokens

# rank -> micro-batch -> indices of the mini-batch's sequences (rows of a padded micro-batch)
Plan = list[list[list[int]]]


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
    micro: list[dict]  # this DP rank's micro-batches
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
                rows = [_padded_row(seqs[i], length, j, policy_version) for j, i in enumerate(members)]
                rows += [_padded_row(None, length, j, policy_version) for j in range(len(members), mbs)]
                placement.update({i: (k, j, 0) for j, i in enumerate(members)})
            else:
                rows = [_packed_row([seqs[i] for i in members], widths[dp_rank][k], policy_version)]
                starts = rows[0].cu_seqlens
                placement.update({i: (k, 0, int(starts[j])) for j, i in enumerate(members)})
            micro.append(micro_batch(rows, use_te))
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


def _packed_row(samples: Sequence[Sample], length: int, policy_version: int, first_id: int = 0) -> PackedSample:
    """Sequences back to back in one row of ``length`` positions, with their per-token fields.
    ``seq_ids`` numbers the row's documents (padding included) from ``first_id``."""
    docs = []
    for s in samples:
        target = np.zeros(len(s.prompt_ids) + len(s.response_ids), np.float32)
        target[len(s.prompt_ids) :] = 1.0  # the response tokens are the ones predicted
        docs.append((np.asarray(s.prompt_ids + s.response_ids, np.int64), target))
    row = assemble_pack(docs, length)
    eng, adv, correct, stale = (np.zeros(length, np.float32) for _ in range(4))
    for s, a in zip(samples, row.cu_seqlens[:-1].tolist()):
        p, r = len(s.prompt_ids), len(s.response_ids)
        eng[a + p - 1 : a + p + r - 1] = s.engine_logprobs
        adv[a : a + p + r] = s.advantage
        correct[a : a + p + r] = float(s.correct)
        stale[a : a + p + r] = float(s.weight_version < policy_version)  # a kept surplus group's sample
    seq_ids = document_ids(row.cu_seqlens, length) + first_id
    row.extra = dict(engine_lp=eng, adv=adv, correct=correct, stale=stale, seq_ids=seq_ids)
    return row


def _padded_row(sample: Optional[Sample], length: int, row: int, policy_version: int) -> PackedSample:
    """One sequence (or none) right-padded to ``length``: a plain row (causal attention).
    Row ``row`` numbers its sequence 2 x row and its padding 2 x row + 1 (unique per micro-batch)."""
    out = _packed_row([] if sample is None else [sample], length, policy_version, first_id=2 * row)
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
