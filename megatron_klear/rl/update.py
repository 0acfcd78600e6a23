"""The policy update of one RL step: old log-probs, then one optimizer step per mini-batch.

Old log-probs are recomputed by the trainer for every mini-batch before the first update, so
the ratio of the first mini-batch starts at 1 and later mini-batches see the drift of the
earlier updates (the paper's off-policy mini-batches). Each mini-batch then takes one optimizer
step of GPPO (token-mean over the whole mini-batch) + alpha x NLL on correct responses.
The LR schedule advances once per RL step, after the last mini-batch (also on a step whose
groups were all filtered), so ``optim.warmup_steps`` and ``optim.decay_steps`` count RL steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from megatron_klear.rl.batch import MiniBatch
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.loss import REPORT_KEYS, old_logprob_fn, rl_loss_fn
from megatron_klear.training.guards import stop_on_nonfinite, weights_finite
from megatron_klear.training.state import TrainState
from megatron_klear.training.step import forward_backward, moe_aux_loss, optimizer_step, reduce_reports


def compute_old_logprobs(train_state: TrainState, minis: list[MiniBatch], cfg: RLConfig, vocab_size: int) -> None:
    """Collective: store the trainer's log-probs of every response token in each micro-batch's
    ``old_lp`` (on the device the last pipeline stage computed them on)."""
    old_fn = old_logprob_fn(vocab_size, cfg.rollout.temperature, cfg.model.logprob_impl)
    for mini in minis:
        reps = forward_backward(train_state, mini.micro, old_fn, forward_only=True)
        for i, mb in enumerate(mini.micro):
            # Only the last pipeline stage computes log-probs; the loss reads them there only.
            mb.old_lp = reps[i]["logp"] if reps else torch.zeros_like(mb.engine_lp)
    train_state.model.train()


def train_minibatches(
    train_state: TrainState, minis: list[MiniBatch], cfg: RLConfig, vocab_size: int, out: Path, step: int, info: dict
) -> dict:
    """Collective: one optimizer step per mini-batch; returns the step's ``loss/*`` and
    ``train/*`` metrics. A non-finite loss, gradient or weight stops the run (``info`` goes
    into the diagnostics) before anything is saved or synced."""
    a = cfg.algo
    sums = dict.fromkeys(REPORT_KEYS, 0.0)
    grad_norms: list[float] = []
    norm_total = 0
    moe: dict[str, float] = {}  # Qwen3-MoE: the router's load-balancing loss, mean over mini-batches
    for mini in minis:
        loss_fn = rl_loss_fn(vocab_size, a, mini, cfg.rollout.temperature, cfg.model.logprob_impl)
        reps = forward_backward(train_state, mini.micro, loss_fn)
        for k, v in moe_aux_loss(train_state, len(mini.micro)).items():
            moe[k] = moe.get(k, 0.0) + v / len(minis)
        _, grad_norm = optimizer_step(train_state, advance_schedule=False)  # once per RL step, below
        rep = reduce_reports(reps, REPORT_KEYS)
        if rep["nonfinite"] > 0 or not math.isfinite(rep["pg_sum"]) or not math.isfinite(grad_norm):
            stop_on_nonfinite(out, step, grad_norm=grad_norm, report=rep, rollout=info)
        grad_norms.append(grad_norm)
        norm_total += mini.num_tokens if a.agg == "token-mean" else mini.num_seqs
        for k in REPORT_KEYS:
            sums[k] += rep[k]
    if minis and not weights_finite(train_state.module):  # never push poisoned weights into the engine
        stop_on_nonfinite(out, step, problem="non-finite weights", grad_norms=grad_norms, rollout=info)
    ntok = max(sums["tokens"], 1.0)
    return {
        "loss/pg": sums["pg_sum"] / max(norm_total, 1),
        "loss/clipfrac_high": sums["clipfrac_high"] / ntok,
        "loss/clipfrac_low": sums["clipfrac_low"] / ntok,
        "loss/dual_clipfrac": sums["dual_clipfrac"] / ntok,
        "loss/ppo_kl": sums["ppo_kl"] / ntok,
        "loss/entropy": sums["entropy"] / ntok,
        "loss/sft_nll": sums["sft_nll"] / max(sums["correct_tokens"], 1.0),
        "loss/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "rollout/train_engine_diff": sums["engine_diff"] / ntok,
        "train/updates": len(minis),
        "train/tokens": sums["tokens"],
        "train/normaliser": norm_total,
        "train/lr": train_state.optimizer.param_groups[0]["lr"],
        **moe,
    }


def update_policy(
    train_state: TrainState, minis: list[MiniBatch], cfg: RLConfig, vocab_size: int, out: Path, step: int, info: dict
) -> dict:
    """Collective: old log-probs for every mini-batch, then the mini-batch updates, then one step
    of the LR schedule; returns metrics (``train/lr``: the LR this step trained with)."""
    t0 = time.time()
    compute_old_logprobs(train_state, minis, cfg, vocab_size)
    t1 = time.time()
    metrics = train_minibatches(train_state, minis, cfg, vocab_size, out, step, info)
    train_state.scheduler.step(increment=1)
    metrics.update({"time/old_logprobs_s": t1 - t0, "time/train_s": time.time() - t1})
    return metrics
