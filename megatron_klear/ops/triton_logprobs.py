"""Fused Triton kernels for vocab-parallel log-probs and entropy (``impl="triton"``).

Forward: one program per row streams this rank's vocabulary slice in blocks and keeps
shift-invariant online statistics in float32 registers:
  m (running max), s = sum e^(z - m), u = sum e^(z - m) (z - m), and the target logit.
Across TP ranks the per-row statistics ``[T, 4]`` are all-gathered once and combined in a
fixed rank order (bitwise identical on every rank). Backward: one program per row recomputes
p = e^(z - lse) from the logits and writes the logits gradient in the logits' dtype.
Memory beyond logits and gradient: O(tokens). On CPU the kernels run under TRITON_INTERPRET=1;
``compile_cases()`` lists every launch for the compile check (``ops.triton_launch``), which
compiles them for sm_90 and sm_80 with the real Triton compiler.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron_klear.ops.logprobs_torch import LOGIT_DTYPES
from megatron_klear.ops.triton_launch import KernelLaunch

# Finite "minus infinity": keeps (m - m_new) * s at 0 instead of NaN. A constexpr, because
# compiled Triton (unlike the interpreter) refuses to read a plain global inside a kernel.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _stats_kernel(
    logits_ptr,
    targets_ptr,
    stats_ptr,
    stride_row,
    v_valid,
    vocab_start,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    m = tl.full((), _NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)
    for start in range(0, v_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < v_valid
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
        z = tl.where(inside, z, _NEG)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(inside, tl.exp(z - m_new), 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(tl.where(inside, e * (z - m_new), 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    t = tl.load(targets_ptr + row) - vocab_start
    owned = (t >= 0) & (t < v_valid)
    z_t = tl.load(base + tl.where(owned, t, 0)).to(tl.float32) * inv_temp
    z_t = tl.where(owned, z_t, float("-inf"))
    out = stats_ptr + row * 4
    tl.store(out + 0, m)
    tl.store(out + 1, s)
    tl.store(out + 2, u)
    tl.store(out + 3, z_t)


@triton.jit
def _grad_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    g_logp_ptr,
    g_ent_ptr,
    grad_ptr,
    stride_row,
    grad_stride_row,
    v_local,
    v_valid,
    vocab_start,
    inv_temp,
    HAS_ENT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * grad_stride_row
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(g_logp_ptr + row)
    t = tl.load(targets_ptr + row) - vocab_start
    if HAS_ENT_GRAD:
        ent = tl.load(ent_ptr + row)
        g_ent = tl.load(g_ent_ptr + row)
    for start in range(0, v_local, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < v_local
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
        p = tl.where(cols < v_valid, tl.exp(z - lse), 0.0)  # vocabulary padding: no mass, no grad
        dz = tl.where(cols == t, g_logp, 0.0) - g_logp * p
        if HAS_ENT_GRAD:
            dz -= g_ent * p * (z - lse + ent)
        tl.store(gbase + cols, (dz * inv_temp).to(grad_ptr.dtype.element_ty), mask=inside)


def _block_v(v_local: int) -> int:
    # Large blocks on GPUs stream well; the interpreter only needs correctness.
    return min(triton.next_power_of_2(max(v_local, 16)), 4096)


def stats_launch(logits, targets, stats, n_valid: int, vocab_start: int, inv_temp: float) -> KernelLaunch:
    """The forward launch over ``[T, V_local]`` logits (one program per row)."""
    args = dict(
        logits_ptr=logits,
        targets_ptr=targets,
        stats_ptr=stats,
        stride_row=logits.stride(0),
        v_valid=n_valid,
        vocab_start=vocab_start,
        inv_temp=inv_temp,
    )
    return KernelLaunch(_stats_kernel, args, dict(BLOCK_V=_block_v(logits.shape[1])))


def grad_launch(
    logits, targets, lse, entropy, g_logp, g_ent, grad, n_valid: int, vocab_start: int, inv_temp: float
) -> KernelLaunch:
    """The backward launch; ``g_ent=None`` compiles the variant without the entropy gradient
    (its pointer is then a placeholder the kernel never reads)."""
    has_ent = g_ent is not None
    args = dict(
        logits_ptr=logits,
        targets_ptr=targets,
        lse_ptr=lse,
        ent_ptr=entropy,
        g_logp_ptr=g_logp,
        g_ent_ptr=g_ent if has_ent else lse,
        grad_ptr=grad,
        stride_row=logits.stride(0),
        grad_stride_row=grad.stride(0),
        v_local=logits.shape[1],
        v_valid=n_valid,
        vocab_start=vocab_start,
        inv_temp=inv_temp,
    )
    return KernelLaunch(_grad_kernel, args, dict(HAS_ENT_GRAD=has_ent, BLOCK_V=_block_v(logits.shape[1])))


def compile_cases() -> list[KernelLaunch]:
    """Every launch this module makes, for the compile check (``ops.triton_launch``): each logits
    dtype the public function accepts, the backward with and without the entropy gradient, at
    Qwen3's local vocabulary sizes (TP=1 and TP=4). Meta tensors: nothing is allocated."""
    cases = []
    t = 4096
    for v_local in (151936, 37984):
        for dtype in LOGIT_DTYPES:
            logits = torch.empty(t, v_local, dtype=dtype, device="meta")
            targets = torch.empty(t, dtype=torch.int64, device="meta")
            rows = torch.empty(t, dtype=torch.float32, device="meta")
            stats = torch.empty(t, 4, dtype=torch.float32, device="meta")
            label = f"{str(dtype).removeprefix('torch.')} V_local={v_local}"
            case = stats_launch(logits, targets, stats, v_local, 0, 1.0)
            case.label = label
            cases.append(case)
            for g_ent in (rows, None):
                case = grad_launch(logits, targets, rows, rows, rows, g_ent, logits, v_local, 0, 1.0)
                case.label = f"{label} entropy_grad={g_ent is not None}"
                cases.append(case)
    return cases


def _gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """[T, 4] per rank -> [TP, T, 4] on every rank: the one collective of the forward."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return stats[None]
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats, group=group)
    return torch.stack(parts)


def combine_stats(all_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank (m, s, u, z_y) ``[TP, T, 4]`` -> (logp, entropy, lse), each ``[T]`` float32."""
    m, s, u, z_y = all_stats.unbind(-1)
    big_m = m.max(dim=0).values
    a = torch.exp(m - big_m)
    big_s = (a * s).sum(0)
    big_u = (a * (u + (m - big_m) * s)).sum(0)
    lse = big_m + torch.log(big_s)
    entropy = torch.log(big_s) - big_u / big_s
    logp = z_y.max(dim=0).values - lse
    return logp, entropy, lse


class _TritonVocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, group, with_entropy, n_valid):
        logits = logits.contiguous()
        t, v_local = logits.shape
        rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        stats = torch.empty((t, 4), dtype=torch.float32, device=logits.device)
        if t:
            stats_launch(logits, targets, stats, n_valid, rank * v_local, 1.0 / temperature).launch((t,))
        logp, entropy, lse = combine_stats(_gather_stats(stats, group))
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.vocab_start, ctx.n_valid = temperature, rank * v_local, n_valid
        return logp, entropy if with_entropy else None

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, entropy = ctx.saved_tensors
        t, v_local = logits.shape
        grad = torch.empty_like(logits)
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        if t:
            launch = grad_launch(
                logits, targets, lse, entropy, g_logp, g_ent, grad, ctx.n_valid, ctx.vocab_start, 1.0 / ctx.temperature
            )
            launch.launch((t,))
        return grad, None, None, None, None, None


def triton_vocab_parallel_logprobs(logits, targets, tp_group, temperature, with_entropy, n_valid):
    """See ``megatron_klear.ops.logprobs.vocab_parallel_logprobs`` (already validated)."""
    return _TritonVocabParallelLogProbs.apply(logits, targets, float(temperature), tp_group, with_entropy, n_valid)
