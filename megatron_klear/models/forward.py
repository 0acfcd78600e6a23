"""Forward passes of a (possibly pipelined) Megatron model that return full logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_klear.errors import ConfigError


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's boolean attention mask (True = masked) for plain causal attention."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather vocab-parallel logits ``[..., V/TP]`` over TP and drop vocabulary padding."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


def padded_length(seq_len: int, tp: int, cp: int = 1) -> int:
    """``seq_len`` rounded up to a multiple of TP x CP: under sequence parallel Megatron scatters
    each (context-parallel share of a) sequence over the TP ranks, and asserts that it divides."""
    multiple = tp * cp
    return -(-seq_len // multiple) * multiple


@torch.no_grad()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Full ``[batch, seq, vocab]`` float32 logits of ``input_ids``.

    Collective. Runs through Megatron's pipeline schedule, so it works at any PP. The
    sequence is right-padded to a multiple of TP x CP (``padded_length``; causal attention
    keeps the padding out of the real positions) and the logits of the real positions are
    returned, on every rank of the last pipeline stage; None elsewhere.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cp = ps.get_context_parallel_world_size()
    if cp > 1:  # every rank would hold the whole sequence, where context parallel expects shares
        raise ConfigError(f"forward_logits runs whole sequences; context_parallel={cp} is not supported")
    model.eval()
    real = input_ids.shape[1]
    pad = padded_length(real, ps.get_tensor_model_parallel_world_size(), cp) - real
    b, s = input_ids.shape[0], real + pad
    dev = next(model.parameters()).device
    input_ids = torch.nn.functional.pad(input_ids.to(dev), (0, pad))  # token 0 after the real ones
    position_ids = torch.arange(s, device=dev).unsqueeze(0).expand(b, -1)
    mask = causal_mask(s, dev)

    def step(data_iter, stage):
        ids = next(data_iter)
        out = stage(ids, position_ids, mask)

        def collect(output, non_loss_data=False):
            return output

        return out, collect

    store = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([input_ids]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    return gather_vocab(store[0][:, :real].float(), vocab_size)


def send_to_rank0(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Move a tensor that lives on the last stage's first TP rank to global rank 0."""
    from megatron.core import parallel_state as ps

    src = ps.get_pipeline_model_parallel_last_rank()  # global rank of last stage, same TP/DP coords
    holder = (
        ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    )
    rank = dist.get_rank()
    if src == 0:
        return tensor if rank == 0 else None
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL moves only CUDA tensors
    if holder and rank == src:
        dist.send(torch.tensor(tensor.shape, dtype=torch.long, device=dev), dst=0)
        dist.send(tensor.to(dev).contiguous(), dst=0)
        return None
    if rank == 0:
        shape = torch.empty(3, dtype=torch.long, device=dev)
        dist.recv(shape, src=src)
        out = torch.empty(*shape.tolist(), dtype=torch.float32, device=dev)
        dist.recv(out, src=src)
        return out.cpu()
    return None
