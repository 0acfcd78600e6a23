"""What the SFT and RL runs share: the ``model``, ``parallel``, ``checkpoint`` and ``log``
config sections, and where the starting model comes from (HF directory or Megatron
checkpoint, created first when a config asks for the tiny model or synthetic data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from megatron_klear.checkpoint.hf_io import HFReader
from megatron_klear.checkpoint.megatron_ckpt import load_model, read_marker
from megatron_klear.data.synthetic import make_dataset
from megatron_klear.distributed import is_main
from megatron_klear.models.config import Qwen3Config, load_hf_config
from megatron_klear.models.qwen3 import ModelOptions, have_transformer_engine
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from megatron_klear.models.weights import load_hf_weights


@dataclass
class ModelSection:
    hf: Optional[str] = None  # HF model directory to start from
    load: Optional[str] = None  # or a Megatron checkpoint (tools/convert_hf_to_megatron.py output)
    create_tiny: Optional[dict] = None  # TinyModelArgs fields: create model.hf first if it is missing
    params_dtype: Optional[str] = None  # default: the checkpoint's dtype
    use_te: Optional[bool] = None  # default: when Transformer Engine is installed
    fp8: Optional[str] = None  # "hybrid" (Transformer Engine only)
    recompute: Optional[str] = None  # null, "full" or "selective"
    logprob_impl: str = "torch"  # "torch" or "triton"


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False  # Transformer Engine only; needs tp > 1
    context_parallel: int = 1  # Transformer Engine only; splits every packed sequence over cp ranks


@dataclass
class CheckpointSection:
    save_interval: int = 500
    keep_last: int = 3
    resume: bool = True
    export_hf: bool = True


@dataclass
class LogSection:
    interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 8
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    peak_tflops: Optional[float] = None  # per device, for MFU (989 for H100 SXM bf16 dense)


def prepare_assets(cfg: Any) -> None:
    """Create the tiny model and the synthetic data a config asks for, once (rank 0)."""

    if is_main():
        if cfg.model.create_tiny is not None and not (Path(cfg.model.hf) / "config.json").is_file():
            make_tiny_model(cfg.model.hf, TinyModelArgs(**cfg.model.create_tiny))
        if cfg.data.generate is not None and not all(Path(p).is_file() for p in cfg.data.train):
            make_dataset(cfg.data.generate)
    if dist.is_initialized():
        dist.barrier()


def model_source(cfg: Any):
    """(HF config, weight loader for ``build_train_state``) from model.hf or model.load."""

    if cfg.model.hf is not None:
        hf_cfg = load_hf_config(cfg.model.hf)
        return hf_cfg, lambda gpt: load_hf_weights(gpt, hf_cfg, HFReader(cfg.model.hf).get)
    read_marker(cfg.model.load)
    hf_cfg = Qwen3Config.from_dict(json.loads((Path(cfg.model.load) / "config.json").read_text()))
    return hf_cfg, lambda gpt: load_model(gpt, cfg.model.load)


def model_options(cfg) -> "ModelOptions":
    """Megatron model options from a run config's ``model`` and ``parallel`` sections (SFT, RL)."""

    return ModelOptions(
        params_dtype=cfg.model.params_dtype,
        use_te=have_transformer_engine() if cfg.model.use_te is None else cfg.model.use_te,
        fp8=cfg.model.fp8,
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.model.recompute,
        init_weights=False,  # weights come from the HF model or a checkpoint
    )


def tokenizer_dir(cfg: Any) -> str:
    return cfg.model.hf or cfg.model.load
