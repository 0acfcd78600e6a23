"""Forward passes of a (possibly pipelined) Megatron model that return full logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


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


@torch.no_grad()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Full ``[batch, seq, vocab]`` float32 logits of ``input_ids``.

    Runs through Megatron's pipeline schedule, so it works at any PP. Returns the logits on
    every rank of the last pipeline stage and None elsewhere. All ranks must call it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    b, s = input_ids.shape
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
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
    return gather_vocab(store[0].float(), vocab_size)


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
