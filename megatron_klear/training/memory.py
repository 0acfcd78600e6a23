"""Estimates of the GPU memory a training step or a log-prob kernel needs, before it runs.

Used to decide what fits a GPU (``tools/gpu_plan.py``, the GPU check's plan) and printed with each
benchmark. They are estimates, built from what each tensor costs, with the one constant we could
not derive measured instead: Megatron-Core's torch-native attention (the local spec, no
Transformer Engine) keeps about ``TORCH_NATIVE_ATTENTION_BYTES`` = 5.1 bytes per head per s^2 per
layer for backward (the scores, their fp32 softmax and the probabilities it multiplies V with),
measured on CPU in the audit of the GPU check. Transformer Engine's fused attention keeps none of
that (O(s) per head).

SFT, bf16 with Megatron's distributed optimizer, per GPU of a TP x PP x DP layout (DP shards only
the fp32 master weights and Adam's moments):

* weights and optimizer: 2 (bf16) + 4 (fp32 gradient buffer) + 12 / DP (fp32 master, Adam m, v)
  bytes per parameter of this rank's share (1 / (TP x PP));
* activations per micro-batch of s tokens, per layer: ``layer_activation_bytes`` (inputs of every
  matmul, norm and the SwiGLU, bf16) plus the attention's s^2 term; ``recompute=full`` keeps only
  each layer's input (2 x s x h bytes) and one layer's activations at a time;
* the output layer's logits and the loss's fp32 log-softmax: ``LOGIT_BYTES`` per token per
  vocabulary entry (bf16 logits, their fp32 copy and log-softmax, the bf16 gradient);
* a fixed ``OVERHEAD_GIB`` (CUDA context, NCCL and allocator caches) and ``FRAGMENTATION``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.hf_mapping import num_params

GIB = 2**30
TORCH_NATIVE_ATTENTION_BYTES = 5.1  # per head per s^2 per layer, measured (module doc)
LOGIT_BYTES = 2 + 4 + 4 + 2  # bf16 logits, fp32 copy, fp32 log-softmax, bf16 gradient
OVERHEAD_GIB = 2.0
FRAGMENTATION = 1.15
# Log-prob + entropy + loss over a [tokens, vocab] bf16 logits tensor, bytes per logit beyond the
# logits and their gradient (4 bytes): the eager torch reference materialises fp32 copies (the
# up-cast, log-softmax, probabilities, p x log p and their backward); torch.compile fuses most of
# them but keeps an fp32 log-softmax; the Triton kernel keeps per-row statistics only.
KERNEL_EXTRA_BYTES = {"eager": 22.0, "compile": 8.0, "triton": 0.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by component; ``total`` includes overhead and fragmentation."""

    weights_and_optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights_and_optimizer + self.activations + self.logits) * FRAGMENTATION + OVERHEAD_GIB * GIB

    @property
    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        parts = (self.weights_and_optimizer, self.activations, self.logits)
        return (
            f"~{self.gib:.1f} GiB (weights + optimizer {parts[0] / GIB:.1f}, activations {parts[1] / GIB:.1f}, "
            f"logits {parts[2] / GIB:.1f}, + {OVERHEAD_GIB:.0f} GiB fixed, x{FRAGMENTATION} fragmentation)"
        )


def layer_activation_bytes(hf: Qwen3Config, tokens: int) -> float:
    """bf16 activations one Qwen3 layer keeps for backward over ``tokens`` tokens, without the
    attention's s^2 term: the two norms' inputs and outputs, Q/K/V and their q/k-norm and RoPE
    outputs, the attention context, the MLP's fc1 output, SwiGLU's two halves and product."""
    h, f = hf.hidden_size, hf.intermediate_size
    q, kv = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    attention = 2 * h + (q + 2 * kv) + 2 * (q + kv) + q
    mlp = 2 * h + 2 * f + 2 * f
    return 2.0 * tokens * (attention + mlp + h)


def attention_bytes(hf: Qwen3Config, seq_len: int, micro_batch: int, use_te: bool) -> float:
    """What one layer's attention keeps per micro-batch beyond ``layer_activation_bytes``."""
    if use_te:
        return 4.0 * micro_batch * hf.num_attention_heads * seq_len  # softmax statistics, fp32
    return TORCH_NATIVE_ATTENTION_BYTES * micro_batch * hf.num_attention_heads * seq_len**2


def sft_memory(
    hf: Qwen3Config,
    seq_len: int,
    micro_batch: int = 1,
    *,
    recompute: Optional[str] = None,
    use_te: bool = False,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
) -> MemoryEstimate:
    """Peak memory of one GPU in an SFT step (see the module doc). Tensor parallel divides the
    weights and the per-layer activations (sequence parallel assumed with TE); the pipeline
    divides the layers (the first stage's in-flight micro-batches are not counted)."""
    layers = hf.num_hidden_layers // pp
    tokens = seq_len * micro_batch
    per_layer = (layer_activation_bytes(hf, tokens) + attention_bytes(hf, seq_len, micro_batch, use_te)) / tp
    if recompute == "full":
        activations = layers * 2.0 * tokens * hf.hidden_size + per_layer
    else:
        activations = layers * per_layer
    weights = num_params(hf) / (tp * pp) * (2 + 4 + 12 / dp)
    logits = LOGIT_BYTES * tokens * hf.vocab_size / tp
    return MemoryEstimate(weights, activations, logits)


def logprob_kernel_memory(tokens: int, vocab: int, impl: str) -> MemoryEstimate:
    """Peak memory of one log-prob + entropy + loss step on bf16 logits (``KERNEL_EXTRA_BYTES``)."""
    return MemoryEstimate(0.0, (4 + KERNEL_EXTRA_BYTES[impl]) * tokens * vocab, 0.0)
