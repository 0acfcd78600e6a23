"""What the SFT and RL runs share: the top-level keys (``RunConfig``: ``model``, ``parallel``,
``optim``, ``checkpoint``, ``log``, ``seed``),
and where the starting model comes from (an HF directory or a Megatron checkpoint, created
first when a config asks for the tiny model or our synthetic data).

Every section validates itself when the config loads (``config.from_dict`` calls
``validate(where)``), so a bad value stops the run before any process group starts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_klear.checkpoint.hf_io import HFReader
from megatron_klear.checkpoint.megatron_ckpt import load_model, read_marker
from megatron_klear.config import FilePath
from megatron_klear.data.synthetic import SyntheticDataConfig, write_synthetic
from megatron_klear.distributed import ParallelConfig, is_main
from megatron_klear.errors import ConfigError, DataError
from megatron_klear.models.config import Qwen3Config, load_hf_config
from megatron_klear.models.qwen3 import ModelOptions
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from megatron_klear.models.weights import load_hf_weights
from megatron_klear.training.metrics import WandbSettings
from megatron_klear.training.state import OptimConfig

LOGPROB_IMPLS = ("torch", "triton")
# The paper's evaluation sampling; an exported model's generation_config.json carries it.
EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95


def require_at_least(section: object, where: str, minimum: float, *names: str) -> None:
    """Raise naming the first of ``names`` (fields of ``section``) below ``minimum``; None passes."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{where}.{name} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig(ModelOptions):
    """The ``model`` section: where the starting weights come from, and how to build the model
    (``params_dtype``, ``use_te``, ``fp8``, ``recompute`` from ``ModelOptions``)."""

    hf: Optional[FilePath] = None  # HF model directory to start from
    load: Optional[FilePath] = None  # or a Megatron checkpoint (tools/convert_hf_to_megatron.py output)
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
    """The ``checkpoint`` section: when to save, what to keep, how to resume."""

    save_interval: int = 500  # save every N steps (and after the last step)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the newest loadable checkpoint in output_dir
    export_hf: bool = True  # write output_dir/hf (HF safetensors + tokenizer) at the end
    # resume even when the seed, model, data or another key outside the free list changed
    allow_config_change: bool = False

    def validate(self, where: str = "checkpoint") -> None:
        require_at_least(self, where, 1, "save_interval", "keep_last")


@dataclass
class LogConfig:
    """The ``log`` section: console, metrics files, validation."""

    interval: int = 1  # console line every N steps (metrics.jsonl gets every step)
    eval_interval: int = 0  # SFT validation loss every N steps (and at step 0 and the end); 0: none
    eval_batches: int = 8  # global batches of the validation set per SFT evaluation
    tensorboard: bool = True  # write output_dir/tensorboard
    wandb_project: Optional[str] = None  # log to Weights & Biases (the wandb extra; offline unless configured)
    wandb_entity: Optional[str] = None  # W&B team or user (default: the login's)
    wandb_group: Optional[str] = None  # W&B group of related runs (e.g. an SFT and its RL stages)
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags of the run
    peak_tflops: Optional[float] = None  # per device, for MFU (989 for H100 SXM bf16 dense)

    def validate(self, where: str = "log") -> None:
        require_at_least(self, where, 1, "interval", "eval_batches")
        require_at_least(self, where, 0, "eval_interval")
        unused = [k for k in ("wandb_entity", "wandb_group", "wandb_tags") if getattr(self, k)]
        if unused and not self.wandb_project:
            raise ConfigError(f"{where}.{unused[0]} needs {where}.wandb_project (the W&B project to log to)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"{where}.peak_tflops must be > 0, got {self.peak_tflops}")

    def wandb(self) -> Optional[WandbSettings]:
        """The W&B settings of the run, or None when it does not log there."""
        if not self.wandb_project:
            return None
        return WandbSettings(self.wandb_project, self.wandb_entity, self.wandb_group, list(self.wandb_tags))

    def check_imports(self, where: str = "log") -> None:
        """The optional packages this section asks for are installed (checked at start-up)."""
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"{where}.tensorboard is true but the tensorboard package is not installed")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"{where}.wandb_project is set but wandb is not installed: pip install -e .[wandb] "
                f"(or set {where}.wandb_project=null)"
            )


@dataclass
class RunConfig:
    """The top-level keys every run has; ``SFTConfig`` and ``RLConfig`` extend it with their
    ``data`` section and their own keys (and RL its own ``optim`` / ``checkpoint`` defaults)."""

    output_dir: FilePath  # everything the run writes: checkpoints, metrics, logs, the HF export
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 1234  # model-parallel RNG seed (initialisation, dropout)


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
    hf_cfg = starting_config(model)
    if model.hf is not None:
        return hf_cfg, lambda gpt: load_hf_weights(gpt, hf_cfg, HFReader(model.hf).get, source=f"model.hf={model.hf}")
    return hf_cfg, lambda gpt: load_model(gpt, model.load)


def starting_config(model: ModelConfig, may_be_missing: bool = False) -> Optional[Qwen3Config]:
    """The HF config of the starting model (errors name the directory or the broken checkpoint
    file); None when ``may_be_missing`` and ``model.hf`` is not there yet (a step before the
    run creates it)."""
    if model.load is not None:
        read_marker(model.load)
        return Qwen3Config.from_dict(json.loads((Path(model.load) / "config.json").read_text()))
    if may_be_missing and not (Path(model.hf) / "config.json").is_file():
        return None
    return load_hf_config(model.hf)


def preflight(
    cfg: RunConfig, data_files: Sequence[str], generate: Optional[str], model_will_exist: bool = False
) -> None:
    """What every rank checks before any process group starts: the optional packages the
    config asks for, the starting model and the data files (unless the config creates them)."""
    cfg.log.check_imports()
    starting_config(cfg.model, may_be_missing=cfg.model.create_tiny is not None or model_will_exist)
    check_data_files(data_files, generate)


def check_data_files(data_files: Sequence[str], generate: Optional[str]) -> None:
    """Every data file exists (unless ``data.generate`` writes them first); the error names each
    missing one."""
    missing = [] if generate is not None else [f for f in data_files if not Path(f).is_file()]
    if missing:
        raise DataError("; ".join(f"{f}: data file does not exist" for f in missing))
