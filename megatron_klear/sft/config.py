"""Typed configuration of an SFT run (YAML + dotted overrides, see ``megatron_klear.config``).

The ``data`` section is ``data.sft.SFTDataConfig``; the shared sections come from
``training.run.RunConfig``. Everything checks itself when it loads, so a bad value stops the run
before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_klear.data.sft import SFTDataConfig
from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import ConfigError
from megatron_klear.models.qwen3 import fp8_sequence_multiple
from megatron_klear.training.run import RunConfig


def check_sequence_layout(seq_len: int, par: ParallelConfig, where: str = "data.seq_len") -> None:
    """A packed sequence of ``seq_len`` splits over context parallel (2 x cp chunks per document)
    and, under sequence parallel, each CP share over the TP ranks; errors name the numbers."""
    cp = par.context_parallel
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(
            f"{where}={seq_len} must be a multiple of 2 x parallel.context_parallel = {2 * cp} "
            "(each document is split into 2 x cp chunks)"
        )
    if par.sequence_parallel and (seq_len // cp) % par.tp:
        raise ConfigError(
            f"{where} / parallel.context_parallel = {seq_len // cp} must be a multiple of parallel.tp={par.tp} "
            "with parallel.sequence_parallel"
        )


def check_fp8_sequence(seq_len: int, par: ParallelConfig, where: str = "data.seq_len") -> None:
    """FP8 GEMMs take token counts that are multiples of 16 (and of 8 per TP rank under sequence
    parallel): a packed sequence of ``seq_len`` must split into such shares
    (``models.qwen3.fp8_sequence_multiple``); the error names the key and the nearest lengths."""
    m = fp8_sequence_multiple(par.tp, par.sequence_parallel, par.context_parallel)
    if seq_len % m:
        lower, upper = seq_len // m * m, (seq_len // m + 1) * m
        raise ConfigError(
            f"{where}={seq_len} must be a multiple of {m} with model.fp8 (FP8 GEMMs take multiples of 16 tokens"
            f"{', 8 per TP rank under parallel.sequence_parallel' if par.sequence_parallel else ''}"
            f"{', after parallel.context_parallel splits it' if par.context_parallel > 1 else ''}): "
            f"use {lower or upper} or {upper}"
        )


@dataclass
class SFTConfig(RunConfig):
    """An SFT run: the YAML file's top level (every section typed and checked at load)."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train_steps: Optional[int] = None  # optimizer steps to train (or set epochs)
    epochs: Optional[float] = None  # alternative to train_steps

    def validate(self) -> None:
        """Checks across sections (each section checked itself when it loaded)."""
        d, par = self.data, self.parallel
        if (self.train_steps is None) == (self.epochs is None):
            raise ConfigError("set exactly one of train_steps and epochs")
        if self.train_steps is not None and self.train_steps < 1:
            raise ConfigError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        check_sequence_layout(d.seq_len, par)
        if self.model.fp8 is not None:
            check_fp8_sequence(d.seq_len, par)

    def batch_layout(self, dp: int) -> tuple[int, int]:
        """(sequences per global batch, micro-batches per rank); errors name the numbers."""
        d = self.data
        seqs = d.global_batch_tokens // d.seq_len
        if seqs % (d.micro_batch_size * dp):
            raise ConfigError(
                f"global batch of {seqs} sequences (data.global_batch_tokens / data.seq_len) is not divisible by "
                f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}"
            )
        return seqs, seqs // (d.micro_batch_size * dp)
