"""The RL micro-batch losses for Megatron's schedule (token sums; Megatron divides by the
global count, see ``training.step``).

Per micro-batch the loss returns ``(sum, count, report)`` with ``count`` = this micro-batch's
share of the aggregation's normaliser (response tokens for token-mean, sequences otherwise),
so the final gradient is GPPO aggregated over the whole mini-batch plus ``alpha x`` the
token-mean NLL of the correct responses (rescaled by the global counts). ``report`` holds device
tensors (``REPORT_KEYS``, sums): nothing here reads a tensor on the host; ``rl.update`` reduces
them once per optimizer step (``training.step.reduce_reports``).
Every input is a field of the typed micro-batch (``rl.batch.RLMicroBatch``, whose docstring
says which are shifted by one token): a row may pack several sequences, told apart by ``seq_ids``.
"""

from __future__ import annotations

import torch

from megatron_klear.ops.logprobs import model_output_logprobs
from megatron_klear.ops.loss import policy_loss, sequence_sums
from megatron_klear.rl.batch import MiniBatch, RLMicroBatch
from megatron_klear.rl.config import AlgoConfig

REPORT_KEYS = (
    "pg_sum",
    "tokens",
    "seqs",
    "clipfrac_high",
    "clipfrac_low",
    "dual_clipfrac",
    "ppo_kl",
    "entropy",
    "sft_nll",
    "correct_tokens",
    "engine_diff",
    "nonfinite",
)


def old_logprob_fn(vocab_size: int, temperature: float, impl: str):
    """Forward-only: report the trainer's log-probs of the response tokens."""

    def fn(logits: torch.Tensor, mb: RLMicroBatch):
        with torch.no_grad():
            logp, _ = model_output_logprobs(logits, mb.labels, vocab_size, temperature=temperature, impl=impl)
        zero = logits.sum() * 0.0
        return zero, mb.loss_mask.sum().to(torch.int), {"logp": logp.float()}  # stays on the device

    return fn


def ratio_baseline(algo: AlgoConfig, mb: RLMicroBatch, dtype: torch.dtype) -> torch.Tensor:
    """The old log-probs the ratio is taken against: the trainer's recomputation
    (``algo.old_logprobs=trainer``) or the engine's (``engine``). Stale tokens (sampled by
    weights older than the policy trained at, ``RLMicroBatch.stale``: a kept surplus group's
    with ``data.surplus=keep``) take the engine's log-probs of the policy that sampled them,
    unless ``algo.tis_cap`` is set, whose truncated IS weight (trainer / engine) corrects them
    instead."""
    old = mb.engine_lp if algo.old_logprobs == "engine" else mb.old_lp
    if algo.tis_cap is None:
        old = torch.where(mb.stale(), mb.engine_lp, old)
    return old.to(dtype)


def rl_loss_fn(vocab_size: int, algo: AlgoConfig, mini: MiniBatch, temperature: float, impl: str):
    """GPPO (or clip / CISPO) + alpha x SFT-on-correct - entropy bonus, for one mini-batch."""
    token_mean = algo.agg == "token-mean"
    norm = mini.num_tokens if token_mean else mini.num_seqs

    def fn(logits: torch.Tensor, mb: RLMicroBatch):
        logp, ent = model_output_logprobs(
            logits, mb.labels, vocab_size, temperature=temperature, with_entropy=True, impl=impl
        )
        mask = mb.loss_mask.to(logp.dtype)
        old = ratio_baseline(algo, mb, logp.dtype)
        adv = mb.adv.to(logp.dtype)
        if algo.tis_cap is not None:  # truncated IS: the engine sampled, the trainer is the target
            w = torch.exp(mb.old_lp.to(logp.dtype) - mb.engine_lp.to(logp.dtype)).clamp(max=algo.tis_cap)
            adv = adv * w.detach()
        pg, m = policy_loss(
            logp,
            old,
            adv,
            mask,
            algo=algo.loss,
            eps_low=algo.eps_low,
            eps_high=algo.eps_high,
            clip_ratio_c=algo.clip_ratio_c,
            beta1=algo.beta1,
            beta2=algo.beta2,
            agg=algo.agg,
            num_tokens=1.0,  # sums: Megatron divides by the global count
            num_seqs=1.0,
            nan_policy="report",
            seq_ids=mb.seq_ids,
        )
        ntok = mask.sum()
        nseq = (sequence_sums(mask, mb.seq_ids) > 0).sum()
        total = pg
        correct_mask = mask * mb.correct.to(logp.dtype)
        nll = -(logp * correct_mask).sum()
        if algo.sft_alpha > 0 and mini.correct_tokens > 0:
            total = total + algo.sft_alpha * nll * (norm / mini.correct_tokens)
        ent_sum = (ent * mask).sum()
        if algo.entropy_coef > 0:
            total = total - algo.entropy_coef * ent_sum * (norm / max(mini.num_tokens, 1))
        report = {  # device tensors: summed over micro-batches and read once per optimizer step
            "pg_sum": pg.detach(),
            "tokens": ntok.detach(),
            "seqs": nseq.detach(),
            "entropy": ent_sum.detach(),
            "sft_nll": nll.detach(),
            "correct_tokens": correct_mask.sum().detach(),
            "engine_diff": ((mb.old_lp.to(logp.dtype) - mb.engine_lp).abs() * mask).sum().detach(),
            "nonfinite": m["nonfinite"],
        }
        for k in ("clipfrac_high", "clipfrac_low", "dual_clipfrac", "ppo_kl"):
            report[k] = m[k] * ntok  # means over this micro-batch's tokens -> sums
        count = ntok if token_mean else nseq
        return total, count.to(torch.int), report

    return fn
