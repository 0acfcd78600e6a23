"""The train state: this rank's model stage in Megatron DDP, its distributed optimizer and the
LR schedule, built from the ``optim`` section (``OptimConfig``). ``training.step`` runs a step
on it; ``training.checkpoint`` saves and restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config
from megatron_klear.models.qwen3 import ModelOptions, build_model, uses_transformer_engine


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay, linear warm-up from 0 then cosine, linear or constant LR.

    The schedule's unit is the run's step: in SFT one optimizer update; in RL one RL step (the
    RL loop advances the schedule once per step, after all of the step's mini-batch updates, as
    verl does), so ``warmup_steps: 10`` in an RL config is 10 RL steps whatever the number of
    mini-batches. Counting steps from 0, step ``k < warmup_steps`` trains at
    ``lr * k / warmup_steps``: the first step at LR 0, as in Megatron and verl.
    """

    lr: float = 8e-5  # peak learning rate
    min_lr: float = 4e-5  # learning rate at the end of the decay
    weight_decay: float = 0.1  # decoupled (AdamW) weight decay
    beta1: float = 0.9  # Adam betas (0.9, 0.95): Megatron's pre-training / SFT convention; the RL
    beta2: float = 0.95  # examples and RL's default optim use the public RL run's (0.9, 0.999)
    eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    warmup_steps: int = 0  # linear warm-up from LR 0 over this many steps (SFT: optimizer updates; RL: RL steps)
    decay_style: str = "cosine"  # "cosine", "linear" or "constant"
    decay_steps: Optional[int] = None  # default: the run's total steps (same unit as warmup_steps)

    def validate(self, where: str = "optim") -> None:
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{where}.min_lr must lie in [0, lr], got {self.min_lr}")
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.decay_style must be cosine, linear or constant, got {self.decay_style!r}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: warmup_steps, clip_grad and weight_decay must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"{where}.eps must be > 0, got {self.eps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"{where}.decay_steps must be >= 1, got {self.decay_steps}")


@dataclass
class TrainState:
    model: Any  # Megatron DDP wrapper around this rank's GPTModel stage
    optimizer: Any
    scheduler: Any
    hf_config: Qwen3Config
    use_te: bool = False  # Transformer Engine layers: THD attention for packed rows, no masks

    @property
    def module(self):
        """The bare GPTModel stage (unwrapped from DDP)."""
        return self.model.module

    def sync_params(self) -> None:
        """Collective over data parallel: make every parameter current now. With
        ``overlap_param_gather`` an optimizer step updates only this rank's shard and the
        all-gather waits for the next forward; a checkpoint save or a weight sync reads the
        parameters outside any forward, so it calls this first."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)


def build_train_state(
    hf_cfg: Qwen3Config,
    opts: ModelOptions,
    optim: OptimConfig,
    total_steps: int,
    init_weights: Optional[Callable[[torch.nn.Module], None]] = None,
    *,
    sequence_parallel: bool = False,
) -> TrainState:
    """Model stage of this rank wrapped in Megatron DDP, with its distributed optimizer.

    ``init_weights(gpt_model)`` loads the starting weights; it runs before the optimizer
    exists, because the optimizer's float32 master copies are taken from the model then.
    ``total_steps``: the run's length in the schedule's unit (``OptimConfig``), the default
    decay length.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gpt = build_model(hf_cfg, opts, sequence_parallel=sequence_parallel, init_weights=init_weights is None, ddp=True)
    if init_weights is not None:
        init_weights(gpt)
    cfg = gpt.config
    cfg.calculate_per_token_loss = True
    # Gradient reduce-scatter overlaps the backward and the parameter all-gather overlaps the
    # next forward (per bucket, in DDP's hooks). The gathered parameters are then current only
    # inside a forward: anything else that reads them calls TrainState.sync_params first.
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,
    )
    model = DistributedDataParallel(cfg, ddp_cfg, gpt)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = model.no_sync
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        params_dtype=cfg.params_dtype,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(ocfg, [model])
    decay_steps = max(1, optim.decay_steps or total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.decay_style != "constant" else optim.lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return TrainState(model, optimizer, scheduler, hf_cfg, use_te=uses_transformer_engine(opts))
