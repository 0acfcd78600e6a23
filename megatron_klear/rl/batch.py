"""Training tensors from kept groups: mini-batches split over DP ranks and micro-batches.

A sequence is prompt + response. Position t predicts token t + 1, so the response tokens are
scored at positions [P - 1, P + R - 1). Every micro-batch of a mini-batch is right-padded to
the mini-batch's longest sequence (Megatron's schedule wants one shape), and the mini-batch is
padded with empty sequences (no loss tokens) to a multiple of DP x micro-batch size.
The global normalisers (response tokens, sequences, tokens of correct responses) are
computed from the whole mini-batch, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_klear.models.forward import causal_mask
from megatron_klear.rl.rollout import Group, Sample


@dataclass
class MiniBatch:
    micro: list[dict]  # this DP rank's micro-batches
    num_tokens: int  # response tokens in the whole mini-batch (all DP ranks)
    num_seqs: int  # sequences with at least one response token
    correct_tokens: int  # response tokens of correct responses
    num_groups: int


def _row(s: Sample | None, length: int) -> dict:
    ids = torch.zeros(length, dtype=torch.long)
    labels = torch.zeros(length, dtype=torch.long)
    mask = torch.zeros(length)
    eng = torch.zeros(length)
    adv, correct, stale = 0.0, 0.0, 0.0
    if s is not None:
        seq = s.prompt_ids + s.response_ids
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[: len(seq)] = torch.tensor(seq)
        labels[: len(seq) - 1] = torch.tensor(seq[1:])
        mask[p - 1 : p + r - 1] = 1.0
        eng[p - 1 : p + r - 1] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
        adv, correct, stale = s.advantage, float(s.correct), float(s.stale)
    return dict(input_ids=ids, labels=labels, mask=mask, engine_lp=eng, adv=adv, correct=correct, stale=stale)


def minibatches(
    groups: list[Group], mini_batch_prompts: int, dp: int, dp_rank: int, mbs: int, pad_to: int = 8
) -> list[MiniBatch]:
    """Split ``groups`` into mini-batches of ``mini_batch_prompts`` groups (the last may be
    smaller when dynamic sampling came up short) and build this rank's micro-batches."""
    out = []
    for start in range(0, len(groups), mini_batch_prompts):
        gs = groups[start : start + mini_batch_prompts]
        seqs: list[Sample | None] = [s for g in gs for s in g if s.response_ids]
        length = max(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
        length = -(-length // pad_to) * pad_to
        while len(seqs) % (dp * mbs):
            seqs.append(None)
        per_rank = len(seqs) // dp
        mine = seqs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        micro = []
        for i in range(0, len(mine), mbs):
            rows = [_row(s, length) for s in mine[i : i + mbs]]
            mb = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "mask", "engine_lp")}
            mb["adv"] = torch.tensor([r["adv"] for r in rows], dtype=torch.float32)
            mb["correct"] = torch.tensor([r["correct"] for r in rows], dtype=torch.float32)
            mb["stale"] = torch.tensor([r["stale"] for r in rows], dtype=torch.float32)
            mb["position_ids"] = torch.arange(length)[None].expand(len(rows), -1)
            mb["attention_mask"] = causal_mask(length)
            micro.append(mb)
        real = [s for s in seqs if s is not None]
        out.append(
            MiniBatch(
                micro=micro,
                num_tokens=sum(len(s.response_ids) for s in real),
                num_seqs=len(real),
                correct_tokens=sum(len(s.response_ids) for s in real if s.correct),
                num_groups=len(gs),
            )
        )
    return out
