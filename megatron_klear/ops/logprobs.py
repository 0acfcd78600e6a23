"""Token log-probs and entropy from vocab-parallel logits.

``logits`` is ``[tokens, vocab/TP]``: this rank's slice of the vocabulary (rank ``r`` holds
ids ``[r * V_local, (r + 1) * V_local)``), as Megatron's output layer produces it.
``targets`` are global token ids. All statistics are accumulated in float32; the gradient
w.r.t. the logits has the logits' dtype. Two implementations behind one function:

* ``impl="torch"``: the reference (materialises float32 ``[tokens, V_local]`` temporaries).
* ``impl="triton"``: fused kernels that stream over the vocabulary with online statistics
  and recompute the softmax in the backward; never a float32 ``[tokens, V_local]`` tensor.

With z = logits / temperature and p = softmax(z):
  logp_y = z_y - lse,  H = lse - sum_j p_j z_j,
  d/dz_j = g_logp (1[j = y] - p_j) - g_H p_j (z_j - lse + H).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_klear import debug

IMPLS = ("torch", "triton")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _TorchVocabParallelLogProbs(torch.autograd.Function):
    """Reference: three all-reduces (max, packed sums), float32 softmax kept for backward."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, group, with_entropy, n_valid):
        rank, _ = _tp(group)
        v_local = logits.shape[-1]
        z = logits.float() / temperature
        valid = torch.arange(v_local, device=logits.device) < n_valid  # vocabulary padding is not a token
        z = torch.where(valid, z, float("-inf"))
        m = _all_reduce(z.max(dim=-1).values.clamp_min(-1e30), dist.ReduceOp.MAX, group)
        e = torch.exp(z - m[:, None])
        z = torch.where(valid, z, 0.0)  # e is 0 there; keeps e * z finite
        local_t = targets - rank * v_local
        owned = (local_t >= 0) & (local_t < v_local)
        z_y = torch.where(owned, z.gather(-1, local_t.clamp(0, v_local - 1)[:, None]).squeeze(-1), 0.0)
        sums = torch.stack([e.sum(-1), (e * z).sum(-1), z_y], dim=0)
        sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
        s, ez, z_y = sums
        lse = m + torch.log(s)
        logp = z_y - lse
        entropy = lse - ez / s
        ctx.save_for_backward(e / s[:, None], z, lse, entropy, local_t, owned)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return logp, entropy if with_entropy else None

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        p, z, lse, entropy, local_t, owned = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        dz = -g_logp[:, None] * p
        if g_ent is not None:
            dz = dz - g_ent.float()[:, None] * p * (z - lse[:, None] + entropy[:, None])
        rows = torch.nonzero(owned).squeeze(-1)
        dz[rows, local_t[rows]] += g_logp[rows]
        return (dz / ctx.temperature).to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "torch",
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each target token and (optionally) the entropy, over TP-sharded logits.

    Args:
        logits: ``[tokens, vocab/TP]``, float32, bfloat16 or float16.
        targets: ``[tokens]`` global token ids (int64).
        tp_group: the tensor-parallel group the vocabulary is split over (None: no split).
        temperature: logits are divided by it before the softmax.
        with_entropy: also return the entropy of the full distribution.
        impl: ``"torch"`` (reference) or ``"triton"`` (fused kernels).
        vocab_size: the real vocabulary size when the logits carry Megatron's padding: ids at
            or beyond it are left out of the softmax (and get zero gradient). That the targets
            lie below it is checked in debug mode only (``megatron_klear.debug``: it reads them
            on the host).

    Returns:
        ``(logprobs [tokens] float32, entropy [tokens] float32 or None)``; differentiable
        w.r.t. ``logits``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [tokens, vocab/TP]")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be a tensor of shape {(logits.shape[0],)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rank, tp = _tp(tp_group)
    v_local = logits.shape[-1]
    limit = v_local * tp if vocab_size is None else vocab_size
    if not 0 < limit <= v_local * tp:
        raise ValueError(f"vocab_size must lie in [1, {v_local * tp}], got {vocab_size}")
    if debug.enabled() and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= limit):
        raise ValueError(f"targets must lie in [0, {limit})")  # read on the host: debug mode and tests only
    targets = targets.long()
    n_valid = max(0, min(v_local, limit - rank * v_local))  # this rank's real (unpadded) columns
    if impl == "triton":
        # Imported here: the kernel module imports triton, an optional dependency.
        from megatron_klear.ops.triton_logprobs import triton_vocab_parallel_logprobs

        return triton_vocab_parallel_logprobs(logits, targets, tp_group, temperature, with_entropy, n_valid)
    return _TorchVocabParallelLogProbs.apply(logits, targets, float(temperature), tp_group, with_entropy, n_valid)


def model_output_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "torch",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``vocab_parallel_logprobs`` over a Megatron output stage's ``[b, s, V/TP]`` logits and
    ``[b, s]`` labels, on Megatron's tensor-parallel group; results are ``[b, s]``."""
    from megatron.core import parallel_state as ps

    b, s, v = logits.shape
    logp, ent = vocab_parallel_logprobs(
        logits.reshape(-1, v),
        labels.reshape(-1),
        tp_group=ps.get_tensor_model_parallel_group(),
        temperature=temperature,
        with_entropy=with_entropy,
        vocab_size=vocab_size,
        impl=impl,
    )
    return logp.view(b, s), (ent.view(b, s) if ent is not None else None)
