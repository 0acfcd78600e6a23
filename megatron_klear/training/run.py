"""What the SFT and RL runs share: the top-level keys (``RunConfig``: ``model``, ``parallel``,
``optim``, ``checkpoint``, ``log``, ``seed``),
and where the starting model comes from (an HF directory or a Megatron checkpoint, created
first when a config asks for the tiny model or our synthetic data).

Every section validates itself when the config loads (``config.from_dict`` calls
``validate(where)``), so a bad value stops the run before any process group starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_klear.checkpoint.hf_io import HFReader
from megatron_klear.checkpoint.megatron_ckpt import load_model, read_marker
from megatron_klear.data.synthetic import SyntheticDataConfig, write_synthetic
from megatron_klear.distributed import ParallelConfig, is_main
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config, load_hf_config
from megatron_klear.models.qwen3 import ModelOptions
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from megatron_klear.models.weights import load_hf_weights
from megatron_klear.training.state import OptimConfig

LOGPROB_IMPLS = ("torch", "triton")


@dataclass
class ModelConfig(ModelOptions):
    """The ``model`` section: where the starting weights come from, and how to build the model
    (``params_dtype``, ``use_te``, ``fp8``, ``recompute`` from ``ModelOptions``)."""

    hf: Optional[str] = None  # HF model directory to start from
    load: Optional[str] = None  # or a Megatron checkpoint (tools/convert_hf_to_megatron.py output)
    create_tiny: Optional[TinyModelArgs] = None  # create model.hf with these shapes first if it is missing
    logprob_impl: str = "torch"  # "torch" or "triton"

    def validate(self, where: str = "model") -> None:
        super().validate(where)
        if (self.hf is None) == (self.load is None):
            raise ConfigError(f"set exactly one of {where}.hf (HF directory) and {where}.load (Megatron checkpoint)")
        if self.create_tiny is not None and self.hf is None:
            raise ConfigError(f"{where}.create_tiny needs {where}.hf (where to create it)")
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"{where}.logprob_impl must be 'torch' or 'triton', got {self.logprob_impl!r}")

    @property
    def tokenizer_dir(self) -> str:
        """The directory the tokenizer is read from (the model's own)."""
        return self.hf or self.load


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` section."""

    save_interval: int = 500
    keep_last: int = 3
    resume: bool = True
    export_hf: bool = True


@dataclass
class LogConfig:
    """The ``log`` section."""

    interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 8
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    peak_tflops: Optional[float] = None  # per device, for MFU (989 for H100 SXM bf16 dense)


@dataclass
class RunConfig:
    """The top-level keys every run has; ``SFTConfig`` and ``RLConfig`` extend it with their
    ``data`` section and their own keys (and RL its own ``optim`` / ``checkpoint`` defaults)."""

    output_dir: str
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 1234


def prepare_assets(
    model: ModelConfig,
    generate: Optional[str],
    data_files: Sequence[str],
    synthetic: Optional[SyntheticDataConfig] = None,
) -> None:
    """Collective: create the tiny model and the synthetic data a config asks for, once (rank 0).

    ``generate`` is the config's ``data.generate`` folder, written (the data set ``synthetic``
    describes, by default ``make_dataset``'s) when any of ``data_files`` is missing.
    """
    if is_main():
        if model.create_tiny is not None and not (Path(model.hf) / "config.json").is_file():
            make_tiny_model(model.hf, model.create_tiny)
        if generate is not None and not all(Path(p).is_file() for p in data_files):
            write_synthetic(generate, synthetic or SyntheticDataConfig())
    if dist.is_initialized():
        dist.barrier()


def model_source(model: ModelConfig) -> tuple[Qwen3Config, Callable[[torch.nn.Module], None]]:
    """(HF config, weight loader for ``build_train_state``) from ``model.hf`` or ``model.load``."""
    if model.hf is not None:
        hf_cfg = load_hf_config(model.hf)
        return hf_cfg, lambda gpt: load_hf_weights(gpt, hf_cfg, HFReader(model.hf).get)
    read_marker(model.load)
    hf_cfg = Qwen3Config.from_dict(json.loads((Path(model.load) / "config.json").read_text()))
    return hf_cfg, lambda gpt: load_model(gpt, model.load)
