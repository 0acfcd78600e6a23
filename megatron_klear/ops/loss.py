"""Policy losses of the paper (GPPO, Eq. 11/12 and 17/18) and its ablation baselines.

Per response token, with ``delta = exp(logp - logp_old)`` and group advantage ``A``:

* ``gppo``: value equals clip-higher PPO with dual clip, but the clipped branches keep a
  gradient: d l / d logp = ``-A * F`` with ``F = beta1 (1 - eps_low)`` if ``A < 0`` and
  ``delta < 1 - eps_low``; ``F = beta2 (1 + eps_high)`` if ``A > 0`` and ``delta > 1 + eps_high``;
  ``F = 0`` if ``A < 0`` and ``delta > c`` (dual clip); ``F = delta`` otherwise. The clipped
  branches are written as ``bound * delta / sg(delta)``: value ``bound``, gradient ``bound``.
* ``clip``: PPO / GRPO clip-higher with the same dual clip; gradient 0 when clipped.
* ``cispo``: ``-A * sg(clamp(delta, 1 - eps_low, 1 + eps_high)) * logp``.

``log r = logp - logp_old`` is clamped to +-``LOG_RATIO_LIMIT`` in value only (straight-through
gradient), so ``exp`` stays finite while GPPO's clipped branches keep their gradient at any ratio.

``nll_loss`` is SFT's micro-batch loss (the token-sum NLL over assistant tokens).

Aggregation (paper Eq. 7, "token-mean"): the sum over response tokens divided by the token
count of the *whole mini-batch* (pass ``num_tokens``), so the gradient does not depend on how
the mini-batch is split into micro-batches or data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_klear.errors import ArgumentError
from megatron_klear.ops.logprobs import model_output_logprobs

ALGOS = ("gppo", "clip", "cispo")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: far past any clip bound, keeps exp finite (value only)


def _clamp_value(x: torch.Tensor, limit: float) -> torch.Tensor:
    """``x`` clamped to ``[-limit, limit]`` in value only: the gradient passes straight through.

    A plain clamp has zero gradient outside the bounds, which would also zero GPPO's preserved
    gradient (``bound * delta / sg(delta)``) at extreme ratios; the clamp is only there to keep
    ``exp`` finite and ``sg(delta)`` non-zero.
    """
    return x + (x.clamp(-limit, limit) - x).detach()


def _check_tensor(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.shape != shape:
        raise ArgumentError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _nonfinite(inputs: tuple[tuple[str, torch.Tensor], ...], mask: torch.Tensor, nan_policy: str) -> torch.Tensor:
    """The number of non-finite input values on response tokens, as a device tensor. With
    ``nan_policy="raise"`` any is an error naming the input: that reads the count on the host
    (a sync), so the training loss reports instead and the host reads the count once per step."""
    on = mask > 0
    counts = [(~torch.isfinite(t.detach()) & on).sum() for _, t in inputs]
    if nan_policy == "raise":
        for (name, _), n in zip(inputs, counts):
            if int(n):
                raise ArgumentError(f"{name} has {int(n)} non-finite values on response tokens")
    return torch.stack(counts).sum().to(mask.dtype)


def sequence_sums(values: torch.Tensor, seq_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sums of ``values`` ``[batch, len]`` per sequence: per row, or with ``seq_ids`` (same
    shape, int64 in ``[0, seq_ids.numel())``) per sequence id, so packed rows that hold several
    sequences aggregate like one row per sequence. Returns ``[batch]`` per row, or
    ``[seq_ids.numel()]`` by id (ids not present sum to 0); differentiable w.r.t. ``values``."""
    if seq_ids is None:
        return values.sum(-1)
    # ids lie in [0, numel): one slot per possible id, so the count never has to be read back
    # from the device; slots of ids not present hold 0 (no tokens)
    return values.new_zeros(seq_ids.numel()).index_add(0, seq_ids.reshape(-1), values.reshape(-1))


def _aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    num_tokens: Optional[float],
    num_seqs: Optional[float],
    seq_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    masked = torch.where(mask > 0, per_token, torch.zeros((), dtype=per_token.dtype))
    if agg == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
        return masked.sum() / denom.clamp_min(1)
    seq_tokens = sequence_sums(mask, seq_ids)
    per_seq = sequence_sums(masked, seq_ids)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / seq_tokens.clamp_min(1)
    has_tokens = (seq_tokens > 0).to(per_token.dtype)
    denom = has_tokens.sum() if num_seqs is None else torch.as_tensor(num_seqs, dtype=per_token.dtype)
    return (per_seq * has_tokens).sum() / denom.clamp_min(1)


def check_policy_args(
    *,
    algo: str,
    agg: str,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float,
    beta1: float,
    beta2: float,
    error: type[Exception] = ArgumentError,
    where: str = "",
) -> None:
    """Raise ``error`` naming the argument (``where`` + name) when a policy-loss setting is out of
    range. ``policy_loss`` and the RL config's ``algo`` section both call this, so a config that
    loads is a config the loss accepts."""
    if algo not in ALGOS:
        raise error(f"{where}algo must be one of {ALGOS}, got {algo!r}")
    if agg not in AGGS:
        raise error(f"{where}agg must be one of {AGGS}, got {agg!r}")
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high), ("beta1", beta1), ("beta2", beta2)):
        if not v >= 0:
            raise error(f"{where}{name} must be >= 0, got {v}")
    if eps_low >= 1:
        raise error(f"{where}eps_low must be < 1, got {eps_low}")
    if not clip_ratio_c > 1:
        raise error(f"{where}clip_ratio_c must be > 1, got {clip_ratio_c}")


@dataclass
class Ratios:
    """The importance ratios of the response tokens; padding zeroed before any arithmetic."""

    logp: torch.Tensor  # current log-probs (with grad), 0 on padding
    advantages: torch.Tensor  # expanded to the token shape, 0 on padding
    log_ratio: torch.Tensor  # logp - logp_old, clamped in value only (straight-through gradient)
    delta: torch.Tensor  # exp(log_ratio), with grad
    detached: torch.Tensor  # delta without grad (the clip decisions and sg(delta))


@dataclass
class ClipBranches:
    """Which tokens each clip branch took (bool, the tokens' shape)."""

    high: torch.Tensor  # A > 0 and delta > 1 + eps_high
    low: torch.Tensor  # A < 0 and delta < 1 - eps_low
    dual: torch.Tensor  # A < 0 and delta > clip_ratio_c


def importance_ratios(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> Ratios:
    """``delta = exp(logp - logp_old)`` per token. Padding positions may hold anything (even
    -inf): they are zeroed first, so nothing non-finite reaches the value or the gradient."""
    on = mask > 0
    zero = torch.zeros((), dtype=logprobs.dtype)
    logp = torch.where(on, logprobs, zero)
    old = torch.where(on, old_logprobs.to(logprobs.dtype), zero)
    adv = torch.where(on, advantages.to(logprobs.dtype).expand(logprobs.shape), zero)
    log_ratio = _clamp_value(logp - old, LOG_RATIO_LIMIT)
    delta = torch.exp(log_ratio)
    return Ratios(logp, adv, log_ratio, delta, delta.detach())


def clip_term(
    r: Ratios, algo: str, eps_low: float, eps_high: float, clip_ratio_c: float, beta1: float, beta2: float
) -> tuple[torch.Tensor, ClipBranches]:
    """The per-token policy term of ``algo`` (module docstring) and the branches taken: GPPO's
    clipped branches keep a gradient (``bound * delta / sg(delta)``), clip's do not, CISPO's
    clipped weight multiplies the log-prob."""
    lo, hi, d, A = 1.0 - eps_low, 1.0 + eps_high, r.detached, r.advantages
    branches = ClipBranches(high=(A > 0) & (d > hi), low=(A < 0) & (d < lo), dual=(A < 0) & (d > clip_ratio_c))
    if algo == "cispo":
        return -A * d.clamp(lo, hi) * r.logp, branches
    delta = r.delta
    if algo == "gppo":
        unit = delta / d  # value 1, gradient d/dlogp = 1: keeps the gradient when clipped
        low_branch, high_branch = beta1 * lo * unit, beta2 * hi * unit
    else:
        low_branch, high_branch = torch.full_like(delta, lo), torch.full_like(delta, hi)
    dual_branch = torch.full_like(delta, clip_ratio_c)  # constant: gradient 0 in every algo
    b = branches
    ratio_term = torch.where(
        b.high, high_branch, torch.where(b.low, low_branch, torch.where(b.dual, dual_branch, delta))
    )
    return -A * ratio_term, branches


def policy_metrics(r: Ratios, b: ClipBranches, mask: torch.Tensor, nonfinite: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip fractions, the PPO KL estimate and the mean ratio over the response tokens, and the
    non-finite input count: 0-dim device tensors (never read back here)."""
    with torch.no_grad():
        n = mask.sum().clamp_min(1)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum() / n

        return {
            "clipfrac_high": mean(b.high),
            "clipfrac_low": mean(b.low),
            "dual_clipfrac": mean(b.dual),
            "ppo_kl": mean(-r.log_ratio),
            "ratio_mean": mean(r.detached),
            "nonfinite": nonfinite,
        }


def _check_policy_inputs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """Types and shapes (metadata only: no sync); returns the advantages as ``[batch, 1 or len]``."""
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ArgumentError("logprobs must be a 2-D tensor [batch, response_len]")
    shape = logprobs.shape
    _check_tensor("logprobs", logprobs, shape)
    _check_tensor("old_logprobs", old_logprobs, shape)
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        raise ArgumentError(f"mask must be a tensor of shape {tuple(shape)}")
    if not isinstance(advantages, torch.Tensor):
        raise ArgumentError("advantages must be a torch.Tensor")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if advantages.shape not in (shape, (shape[0], 1)):
        raise ArgumentError(
            f"advantages has shape {tuple(advantages.shape)}, expected {(shape[0], 1)} or {tuple(shape)}"
        )
    _check_tensor("advantages", advantages, advantages.shape)
    if seq_ids is not None and (not isinstance(seq_ids, torch.Tensor) or seq_ids.shape != shape):
        raise ArgumentError(f"seq_ids must be a tensor of shape {tuple(shape)}")
    return advantages


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    algo: str = "gppo",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_ratio_c: float = 10.0,
    beta1: float = 1.0,
    beta2: float = 1.0,
    agg: str = "token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    nan_policy: str = "raise",
    seq_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss over ``[batch, response_len]`` token log-probs: ``importance_ratios``
    -> ``clip_term`` -> aggregation, and ``policy_metrics``.

    Args:
        logprobs: log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: the same under the policy that generated the data.
        advantages: ``[batch, 1]`` or ``[batch, response_len]``.
        mask: 1 on response tokens, 0 elsewhere.
        num_tokens: global normaliser for ``token-mean`` (response tokens of the whole
            mini-batch over micro-batches and DP ranks); default: this call's token count.
        num_seqs: global normaliser for the ``seq-mean-*`` modes (sequences with at least
            one response token in the mini-batch); default: this call's count.
        nan_policy: ``"raise"`` on non-finite inputs at response tokens (reads the count on the
            host), or ``"report"`` (counted in ``metrics["nonfinite"]``, and the loss is NaN,
            never silently finite; no host sync).
        seq_ids: ``[batch, response_len]`` int64 sequence index of every token, in
            ``[0, batch * response_len)``, for the ``seq-mean-*`` modes when a row packs several
            sequences (default: one per row).

    Returns:
        ``(loss, metrics)``; metrics are 0-dim tensors on the loss's device over this call's
        response tokens: ``clipfrac_high``, ``clipfrac_low``, ``dual_clipfrac``, ``ppo_kl``,
        ``ratio_mean`` (means) and ``nonfinite`` (a count). Nothing here syncs with the host
        unless ``nan_policy="raise"``.
    """
    check_policy_args(
        algo=algo, agg=agg, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c, beta1=beta1, beta2=beta2
    )
    if nan_policy not in ("raise", "report"):
        raise ArgumentError(f"nan_policy must be 'raise' or 'report', got {nan_policy!r}")
    advantages = _check_policy_inputs(logprobs, old_logprobs, advantages, mask, seq_ids)
    mask = mask.to(logprobs.dtype)
    inputs = (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages.expand(mask.shape)))
    nonfinite = _nonfinite(inputs, mask, nan_policy)
    ratios = importance_ratios(logprobs, old_logprobs, advantages, mask)
    per_token, branches = clip_term(ratios, algo, eps_low, eps_high, clip_ratio_c, beta1, beta2)
    loss = _aggregate(per_token, mask, agg, num_tokens, num_seqs, seq_ids)
    loss = loss + torch.where(nonfinite > 0, float("nan"), 0.0).to(loss.dtype)  # never silently finite
    return loss, policy_metrics(ratios, branches, mask, nonfinite)


def sft_on_correct_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, num_tokens: Optional[float] = None
) -> torch.Tensor:
    """Token-mean NLL over the response tokens of correct responses (paper Eq. 13/14).

    ``correct`` is ``[batch]`` (bool or 0/1). ``num_tokens`` is the global normaliser: the
    response tokens of correct responses in the whole mini-batch; 0 tokens give a zero loss.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ArgumentError("logprobs must be a 2-D tensor [batch, response_len]")
    _check_tensor("logprobs", logprobs, logprobs.shape)
    if not isinstance(mask, torch.Tensor) or mask.shape != logprobs.shape:
        raise ArgumentError(f"mask must be a tensor of shape {tuple(logprobs.shape)}")
    if not isinstance(correct, torch.Tensor) or correct.shape != logprobs.shape[:1]:
        raise ArgumentError(f"correct must be a tensor of shape {(logprobs.shape[0],)}")
    keep = (mask > 0) & (correct > 0)[:, None]
    denom = keep.sum().to(logprobs.dtype) if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    return -torch.where(keep, logprobs, torch.zeros((), dtype=logprobs.dtype)).sum() / denom.clamp_min(1)


def nll_loss(vocab_size: int, impl: str):
    """SFT's loss of one micro-batch (anything with ``labels`` and ``loss_mask``) for Megatron's
    schedule: ``(sum of -log p over supervised tokens, their count, report)``; everything stays
    on the device."""

    def loss(logits: torch.Tensor, mb):
        logp, _ = model_output_logprobs(logits, mb.labels, vocab_size, impl=impl)
        mask = mb.loss_mask.to(logp.dtype)
        total = -(logp * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"loss_sum": total.detach(), "tokens": count.detach()}

    return loss
