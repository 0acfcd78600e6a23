"""Long-CoT SFT on Megatron-Core.

    torchrun --nproc-per-node N -m megatron_klear.sft --config examples/tiny/sft.yaml [key=value ...]

One step: take the next global batch of packed sequences (``global_batch_tokens`` tokens),
split it over data-parallel ranks and micro-batches, run Megatron's pipeline schedule with
the token-sum NLL over assistant tokens (normalised by the global batch's token count),
clip, step the distributed optimizer and the LR schedule; log, validate, checkpoint.
``SFTRun`` is the run's lifecycle (``training.lifecycle``) with SFT's data and step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_klear.cli import DryRun, run_config_entry
from megatron_klear.data.sft import SFTDataset, check_sft_rows
from megatron_klear.distributed import comm_device, rank0_first
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config, validate_training_layout
from megatron_klear.models.qwen3 import uses_transformer_engine
from megatron_klear.ops.loss import nll_loss
from megatron_klear.sft.config import SFTConfig
from megatron_klear.training.batches import BatchStream, GlobalBatch
from megatron_klear.training.guards import maybe_crash, stop_on_nonfinite
from megatron_klear.training.lifecycle import RunInputs, TrainingRun
from megatron_klear.training.metrics import model_flops
from megatron_klear.training.run import EVAL_TEMPERATURE, EVAL_TOP_P, check_data_files, starting_config
from megatron_klear.training.run_state import DataPosition
from megatron_klear.training.rundir import writable_problem
from megatron_klear.training.step import forward_backward, moe_aux_loss, optimizer_step, reduce_reports


def batch_work(hf_cfg, lengths: list) -> tuple[float, float]:
    """Collective over data parallel: (real tokens, model FLOPs) of a global batch, from the
    document lengths of each rank's packs (``GlobalBatch.lengths``)."""
    from megatron.core import parallel_state as ps

    local = [sum(int(np.sum(d)) for d in lengths), sum(model_flops(hf_cfg, d) for d in lengths)]
    work = torch.tensor(local, dtype=torch.float64, device=comm_device())
    if dist.is_initialized():  # the CP ranks of a group hold shares of the same packs: DP only
        dist.all_reduce(work, group=ps.get_data_parallel_group())
    return float(work[0]), float(work[1])


def check_model_fits(cfg: SFTConfig, hf_cfg: Qwen3Config) -> None:
    """The parallel layout divides the model, and a packed sequence fits its positions."""
    validate_training_layout(hf_cfg, cfg.parallel)
    if cfg.data.seq_len > hf_cfg.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's "
            f"max_position_embeddings={hf_cfg.max_position_embeddings}"
        )


class SFTRun(TrainingRun):
    """One SFT run: packed data sets, the batch layout, the NLL step, validation."""

    kind = "sft"

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg)
        self.cfg: SFTConfig = cfg
        self.valid_ds = None
        self.loss_fn = None

    # -- the lifecycle's hooks -------------------------------------------------------------
    def inputs(self) -> RunInputs:
        d = self.cfg.data
        return RunInputs(d.train + d.valid, d.generate, d.train, d.synthetic)

    def check_layout(self) -> None:
        from megatron.core import parallel_state as ps

        self.dp = ps.get_data_parallel_world_size()
        self.seqs, self.n_micro = self.cfg.batch_layout(self.dp)

    def check_model(self, hf_cfg: Qwen3Config) -> None:
        check_model_fits(self.cfg, hf_cfg)

    def load_data(self) -> None:
        d, par = self.cfg.data, self.cfg.parallel
        align = 2 * par.context_parallel if par.context_parallel > 1 else 1

        def dataset(paths):  # rank 0 builds the token cache (progress lines as it goes), the others map it
            build = lambda: SFTDataset(d, self.cfg.model.tokenizer_dir, paths, align)  # noqa: E731
            return rank0_first(build, f"token cache of {', '.join(paths)}")

        self.train_ds = dataset(d.train)
        self.valid_ds = dataset(d.valid) if d.valid else None
        steps_per_epoch = max(1, self.train_ds.packs_per_epoch() // self.seqs)
        self.total = self.cfg.train_steps or max(1, math.ceil(self.cfg.epochs * steps_per_epoch))

    def total_steps(self) -> int:
        return self.total

    def started(self) -> None:
        from megatron.core import parallel_state as ps

        cfg, par = self.cfg, self.cfg.parallel
        if self.rank0:
            print(
                f"SFT: {self.train_ds.stats()} | {self.seqs} sequences x {cfg.data.seq_len} tokens per step, "
                f"dp={self.dp} tp={par.tp} pp={par.pp} cp={par.context_parallel}, {self.n_micro} micro-batches "
                f"per rank, {self.total} steps",
                flush=True,
            )
        self.loss_fn = nll_loss(self.hf_cfg.vocab_size, cfg.model.logprob_impl)
        self.stream_args = dict(
            seqs_per_batch=self.seqs,
            n_micro=self.n_micro,
            mbs=cfg.data.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(),
            use_te=uses_transformer_engine(cfg.model),
            cp=(ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()),
        )
        self.stream = BatchStream(self.train_ds, **self.stream_args)

    def export_sampling(self) -> dict:
        return {"temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P}

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> dict:
        """Batch -> step -> log / validate / checkpoint until the last step; returns its metrics."""
        metrics: dict = {}
        if self.step == 0 and self.validation_due(0):
            self.logger.log(0, {"val_loss": self.validate()})
        while self.step < self.total:
            t0 = time.time()
            batch = self.stream.global_batch(self.state.position)  # this rank's micro-batches
            metrics = self.train_step(batch)  # forward, backward, optimizer; the step is counted
            metrics.update(self.throughput(batch, time.time() - t0))
            if self.validation_due(self.step):  # every log.eval_interval steps, and after the last
                metrics["val_loss"] = self.validate()
            self.log(metrics)
            maybe_crash("step", self.step)
            self.save_on_interval()
            if self.stop_requested():  # checkpointed: the time limit is near (training.lifecycle)
                break
        return metrics

    def train_step(self, batch: GlobalBatch) -> dict:
        """One optimizer step on ``batch``; a non-finite loss or gradient stops the run before
        anything is logged or saved. The run state advances to the next batch."""
        reports = forward_backward(self.train_state, batch.micro, self.loss_fn)
        applied, grad_norm = optimizer_step(self.train_state)
        rep = reduce_reports(reports, ("loss_sum", "tokens"))  # the step's one host transfer
        loss = rep["loss_sum"] / max(rep["tokens"], 1.0)
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            pos = self.state.position
            stop_on_nonfinite(
                self.out, self.step + 1, loss=loss, grad_norm=grad_norm, data_epoch=pos.epoch, data_pack=pos.index
            )
        self.batch_tokens, self.batch_flops = batch_work(self.hf_cfg, batch.lengths)  # padding counts for neither
        self.state.advance(batch.next, tokens=self.batch_tokens)
        return {
            "loss": loss,
            "lr": self.train_state.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "supervised_tokens": rep["tokens"],
            "epoch": self.state.position.epoch,
            "skipped_update": not applied,
            **moe_aux_loss(self.train_state, len(batch.micro)),  # Qwen3-MoE: the router's balance
        }

    def throughput(self, batch: GlobalBatch, seconds: float) -> dict:
        """Tokens per second (real tokens: padding excluded), pack fill, MFU, peak memory."""
        world = dist.get_world_size()
        tok_s = self.batch_tokens / seconds
        m = {
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / world,
            "step_time_s": seconds,
            "pack_fill": self.batch_tokens / (self.seqs * self.cfg.data.seq_len),
        }
        if self.cfg.log.peak_tflops:
            m["mfu"] = self.batch_flops / seconds / world / (self.cfg.log.peak_tflops * 1e12)
        if torch.cuda.is_available():
            m["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return m

    def validation_due(self, step: int) -> bool:
        """Every ``log.eval_interval`` steps, before the first and after the last."""
        interval = self.cfg.log.eval_interval
        return self.valid_ds is not None and interval > 0 and (step % interval == 0 or step == self.total)

    def validate(self) -> float:
        """Collective: the loss over up to ``log.eval_batches`` global batches of the validation
        set (one pass at most)."""
        stream = BatchStream(self.valid_ds, **self.stream_args)
        total = {"loss_sum": 0.0, "tokens": 0.0}
        pos = DataPosition()
        for _ in range(self.cfg.log.eval_batches):
            batch = stream.global_batch(pos)
            pos = batch.next
            reports = forward_backward(self.train_state, batch.micro, self.loss_fn, forward_only=True)
            rep = reduce_reports(reports, total)
            for k in total:
                total[k] += rep[k]
            if pos.epoch > 0:  # one pass over the validation set is enough
                break
        self.train_state.model.train()
        return total["loss_sum"] / max(total["tokens"], 1.0)


def train(cfg: SFTConfig) -> dict:
    """Run (or resume) SFT; returns the last step's metrics."""
    with SFTRun(cfg) as run:
        return run.train()


def dry_run(cfg: SFTConfig, report: DryRun) -> None:
    """``--dry-run``: everything an SFT run checks before it trains, for the job's world size,
    without starting anything; every problem goes into ``report``."""
    d = cfg.data
    report.check(cfg.log.check_imports)
    report.check(check_data_files, d.train + d.valid, d.generate)
    problem = writable_problem(Path(cfg.output_dir))
    if problem:
        report.problems.append(f"output_dir {cfg.output_dir}: {problem}")
    world = report.world_size
    layout = report.check(lambda: cfg.batch_layout(cfg.parallel.data_parallel_size(world)))
    hf_cfg = report.check(starting_config, cfg.model, cfg.model.create_tiny is not None)
    if hf_cfg is not None:
        report.check(check_model_fits, cfg, hf_cfg)
    for path in d.train + d.valid:
        if Path(path).is_file():
            rows = report.check(check_sft_rows, path, d)
            if rows is not None:
                print(f"{path}: {rows}", flush=True)
        elif d.generate is not None:
            print(f"{path}: written by data.generate={d.generate} first; not read now", flush=True)
    if hf_cfg is None and cfg.model.create_tiny is not None:
        print(f"model.hf={cfg.model.hf}: created by model.create_tiny first; not read now", flush=True)
    if layout is not None:
        print(f"world size {world}: {layout[0]} sequences per step, {layout[1]} micro-batches per rank", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m megatron_klear.sft``: the command line (``cli.run_config_entry``)."""
    return run_config_entry(SFTConfig, train, __doc__, argv, dry_run, prog="python -m megatron_klear.sft")
