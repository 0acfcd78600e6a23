"""The reference (torch) implementation of vocab-parallel token log-probs and entropy.

Materialises float32 ``[tokens, V_local]`` temporaries; three all-reduces over the
tensor-parallel group (max, packed sums). ``ops.logprobs.vocab_parallel_logprobs`` dispatches
here (``impl="torch"``) or to the fused Triton kernels (``ops.triton_logprobs``), which share
``LOGIT_DTYPES`` with this module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tp_rank_size(group) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel ``group``; (0, 1) without one."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_tp(t: torch.Tensor, op, group) -> torch.Tensor:
    """All-reduce ``t`` in place over ``group`` when it has more than one rank; returns ``t``."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class TorchVocabParallelLogProbs(torch.autograd.Function):
    """Reference: three all-reduces (max, packed sums), float32 softmax kept for backward."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, group, with_entropy, n_valid):
        rank, _ = tp_rank_size(group)
        v_local = logits.shape[-1]
        z = logits.float() / temperature
        valid = torch.arange(v_local, device=logits.device) < n_valid  # vocabulary padding is not a token
        z = torch.where(valid, z, float("-inf"))
        m = all_reduce_tp(z.max(dim=-1).values.clamp_min(-1e30), dist.ReduceOp.MAX, group)
        e = torch.exp(z - m[:, None])
        z = torch.where(valid, z, 0.0)  # e is 0 there; keeps e * z finite
        local_t = targets - rank * v_local
        owned = (local_t >= 0) & (local_t < v_local)
        z_y = torch.where(owned, z.gather(-1, local_t.clamp(0, v_local - 1)[:, None]).squeeze(-1), 0.0)
        sums = torch.stack([e.sum(-1), (e * z).sum(-1), z_y], dim=0)
        sums = all_reduce_tp(sums, dist.ReduceOp.SUM, group)
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
