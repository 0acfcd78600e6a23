"""One training step on the train state: Megatron's pipeline schedule and the optimizer.

The loss is a token sum per micro-batch with Megatron's ``calculate_per_token_loss``: the
schedule sums the token counts, DDP sums gradients across data- and context-parallel ranks,
and ``finalize_model_grads`` divides by the global count. So the gradient is the token mean over
the whole global batch, whatever the split into micro-batches and DP ranks.

Qwen3-MoE: Megatron's router adds the load-balancing loss's gradient itself (scaled per token
like the main loss) and records the loss per layer in its tracker; ``moe_aux_loss`` reads the
last training pass's value for the logs (the tracker is cleared when a training pass starts, so
forward-only passes such as validation or old log-probs never count).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_klear import debug
from megatron_klear.distributed import comm_device
from megatron_klear.training.batches import MicroBatch, attention_inputs
from megatron_klear.training.state import TrainState

# A micro-batch loss: (logits of this micro-batch [b, s, V/TP], the micro-batch) ->
# (sum of per-token losses, number of tokens, dict of tensors to report, kept on the device).
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor, dict]]


def forward_backward(
    train_state: TrainState, micro_batches: list[MicroBatch], loss_fn: LossFn, *, forward_only: bool = False
) -> list[dict]:
    """Collective: run Megatron's pipeline schedule over ``micro_batches``; returns the loss dicts.

    Each micro-batch is a ``training.batches.MicroBatch`` (or an extension with the fields
    ``loss_fn`` needs); in debug mode its shape contract is checked as it runs. Attention
    masks are built as each micro-batch runs. Shapes may differ between micro-batches: at
    PP > 1 the stages then exchange each activation's shape first (``variable_seq_lengths``).
    Every rank of a pipeline must pass micro-batches of the same shapes in the same order.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shapes = {mb.shape for mb in micro_batches}
    b, s = max(shapes, key=lambda shape: shape[0] * shape[1])  # s: this context-parallel rank's share
    dev = next(train_state.model.parameters()).device
    train_state.module.config.variable_seq_lengths = len(shapes) > 1
    causal_masks: dict = {}  # one plain causal mask per length, for this call only

    def step(data_iter, model):
        mb = next(data_iter).to(dev)
        if debug.enabled():
            mb.validate()
        attn = attention_inputs(mb, train_state.use_te, dev, causal_masks)
        logits = model(mb.input_ids, mb.position_ids, **attn)

        def loss(output):
            total, count, report = loss_fn(output, mb)
            return total, count, report

        return logits, loss

    if not forward_only:
        train_state.model.zero_grad_buffer()
        train_state.optimizer.zero_grad()
        clear_moe_tracker()
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(micro_batches),
        model=[train_state.model],
        num_microbatches=len(micro_batches),
        seq_length=s * ps.get_context_parallel_world_size(),  # the schedule divides by cp itself
        micro_batch_size=b,
        forward_only=forward_only,
    )


def optimizer_step(train_state: TrainState, advance_schedule: bool = True) -> tuple[bool, float]:
    """Apply the optimizer and (unless ``advance_schedule`` is False: the RL loop advances it
    once per RL step) the LR schedule; returns (applied, grad norm)."""
    ok, grad_norm, _ = train_state.optimizer.step()
    if ok and advance_schedule:
        train_state.scheduler.step(increment=1)
    return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")


def reduce_reports(reports: Iterable[dict], keys: Iterable[str]) -> dict[str, float]:
    """Sum report entries over micro-batches (last stage) and over DP x CP; same on every rank.

    The entries stay where the loss left them (device tensors) until here: they are stacked
    and summed on the device, reduced across ranks, and read on the host once, so a step's
    metrics cost one device-to-host transfer however many micro-batches it has."""
    from megatron.core import parallel_state as ps

    keys, dev = list(keys), comm_device()
    rows = [torch.stack([torch.as_tensor(r[k]).to(dev, torch.float64).reshape(()) for k in keys]) for r in reports]
    local = torch.stack(rows).sum(0) if rows else torch.zeros(len(keys), dtype=torch.float64, device=dev)
    if dist.is_initialized():
        dist.all_reduce(local, group=ps.get_data_parallel_group(with_context_parallel=True))
        # only the last pipeline stage computed losses: take its numbers everywhere
        dist.broadcast(
            local, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    return dict(zip(keys, local.tolist()))  # the one host transfer


MOE_AUX_LOSS = "load_balancing_loss"  # the name Megatron's router records it under


def clear_moe_tracker() -> None:
    """Zero Megatron's per-layer MoE loss tracker (nothing to do for a dense model)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def moe_aux_loss(train_state: TrainState, num_micro_batches: int) -> dict[str, float]:
    """Collective: ``{"moe/load_balancing_loss": ...}``, the router's load-balancing loss of the
    last training ``forward_backward`` before its coefficient (1.0 for a perfectly balanced
    router), averaged over micro-batches, MoE layers and data-parallel ranks; ``{}`` for a dense
    model or with the loss off (``model.moe_aux_loss_coef=0``).

    Megatron's own reduction averages over DP with ``ReduceOp.AVG``, which gloo lacks: this sums
    over the stages (each holds its layers' entries) and over TP x CP (each rank's loss covers its
    share of the tokens), then takes the mean over every DP rank's micro-batches (their numbers
    may differ: RL balances tokens, not micro-batches)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    config = train_state.module.config
    if not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return {}
    entry = get_moe_layer_wise_logging_tracker().get(MOE_AUX_LOSS)
    values = torch.zeros(config.num_layers, dtype=torch.float64, device=comm_device())
    if entry is not None:  # a stage without MoE layers records nothing
        values += entry["values"].to(values)
    if dist.is_initialized():
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(values, group=ps.get_tensor_and_context_parallel_group())
    total = torch.stack([values.sum(), torch.tensor(float(num_micro_batches), dtype=values.dtype).to(values)])
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    hf = train_state.hf_config
    sparse = sum(hf.is_sparse(i) for i in range(hf.num_hidden_layers))
    clear_moe_tracker()
    return {f"moe/{MOE_AUX_LOSS}": float(total[0]) / max(sparse, 1) / max(float(total[1]), 1.0)}
