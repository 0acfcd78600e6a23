"""Token log-probs and entropy from vocab-parallel logits.

``logits`` is ``[tokens, vocab/TP]``: this rank's slice of the vocabulary (rank ``r`` holds
ids ``[r * V_local, (r + 1) * V_local)``), as Megatron's output layer produces it.
``targets`` are global token ids. All statistics are accumulated in float32; the gradient
w.r.t. the logits has the logits' dtype. Two implementations behind one function:

* ``impl="torch"``: the reference (``ops.logprobs_torch``; materialises float32
  ``[tokens, V_local]`` temporaries).
* ``impl="triton"``: fused kernels that stream over the vocabulary with online statistics
  and recompute the softmax in the backward; never a float32 ``[tokens, V_local]`` tensor.

With z = logits / temperature and p = softmax(z):
  logp_y = z_y - lse,  H = lse - sum_j p_j z_j,
  d/dz_j = g_logp (1[j = y] - p_j) - g_H p_j (z_j - lse + H).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_klear import debug
from megatron_klear.errors import ArgumentError
from megatron_klear.ops.logprobs_torch import LOGIT_DTYPES, TorchVocabParallelLogProbs, tp_rank_size

IMPLS = ("torch", "triton")


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
        raise ArgumentError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ArgumentError("logits must be a 2-D tensor [tokens, vocab/TP]")
    if logits.dtype not in LOGIT_DTYPES:
        raise ArgumentError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1]:
        raise ArgumentError(f"targets must be a tensor of shape {(logits.shape[0],)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ArgumentError(f"targets must be int64 or int32, got {targets.dtype}")
    if not temperature > 0:
        raise ArgumentError(f"temperature must be > 0, got {temperature}")
    rank, tp = tp_rank_size(tp_group)
    v_local = logits.shape[-1]
    limit = v_local * tp if vocab_size is None else vocab_size
    if not 0 < limit <= v_local * tp:
        raise ArgumentError(f"vocab_size must lie in [1, {v_local * tp}], got {vocab_size}")
    if debug.enabled() and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= limit):
        raise ArgumentError(f"targets must lie in [0, {limit})")  # read on the host: debug mode and tests only
    targets = targets.long()
    n_valid = max(0, min(v_local, limit - rank * v_local))  # this rank's real (unpadded) columns
    if impl == "triton":
        # Imported here: the kernel module imports triton, an optional dependency.
        from megatron_klear.ops.triton_logprobs import triton_vocab_parallel_logprobs

        return triton_vocab_parallel_logprobs(logits, targets, tp_group, temperature, with_entropy, n_valid)
    return TorchVocabParallelLogProbs.apply(logits, targets, float(temperature), tp_group, with_entropy, n_valid)


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
