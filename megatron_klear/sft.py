"""Long-CoT SFT on Megatron-Core.

    torchrun --nproc-per-node N -m megatron_klear.sft --config examples/tiny/sft.yaml [key=value ...]

One step: take the next global batch of packed sequences (``global_batch_tokens`` tokens),
split it over data-parallel ranks and micro-batches, run Megatron's pipeline schedule with
the token-sum NLL over assistant tokens (normalised by the global batch's token count),
clip, step the distributed optimizer and the LR schedule; log, validate, checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_klear.cli import run_config_entry
from megatron_klear.config import to_dict
from megatron_klear.data.sft import SFTDataConfig, SFTDataset, check_sft_rows
from megatron_klear.distributed import DistEnv, ParallelConfig, comm_device, init_distributed, is_main, rank0_first
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config, validate_parallel
from megatron_klear.models.qwen3 import uses_transformer_engine
from megatron_klear.ops.logprobs import model_output_logprobs
from megatron_klear.training.batches import micro_batch
from megatron_klear.training.checkpoint import export_hf, load_first, save_checkpoint
from megatron_klear.training.guards import maybe_crash, stop_on_nonfinite
from megatron_klear.training.metrics import MetricsLogger, model_flops
from megatron_klear.training.run import (
    EVAL_TEMPERATURE,
    EVAL_TOP_P,
    RunConfig,
    model_source,
    preflight,
    prepare_assets,
    starting_config,
)
from megatron_klear.training.rundir import open_run, start_logs, writable_problem
from megatron_klear.training.state import build_train_state
from megatron_klear.training.step import forward_backward, optimizer_step, reduce_reports


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


def nll_loss(vocab_size: int, impl: str):
    """Per micro-batch: (sum of -log p over assistant tokens, their count, report)."""

    def loss(logits: torch.Tensor, mb: dict):
        logp, _ = model_output_logprobs(logits, mb["labels"], vocab_size, impl=impl)
        mask = mb["loss_mask"].to(logp.dtype)
        total = -(logp * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"loss_sum": total.detach(), "tokens": count.detach()}

    return loss


class BatchStream:
    """This DP rank's micro-batches of each global batch, from a resumable data position."""

    def __init__(
        self,
        dataset,
        seqs_per_batch: int,
        n_micro: int,
        mbs: int,
        dp_rank: int,
        use_te: bool,
        cp: tuple[int, int] = (1, 0),
    ):
        self.ds, self.seqs, self.n_micro, self.mbs, self.dp_rank, self.use_te = (
            dataset,
            seqs_per_batch,
            n_micro,
            mbs,
            dp_rank,
            use_te,
        )
        self.cp_size, self.cp_rank = cp  # the ranks of one context-parallel group share each sequence

    def global_batch(self, epoch: int, pack: int):
        """Micro-batches of the global batch starting at (epoch, pack), the next position, and
        the real document lengths of this rank's packs (padding excluded)."""

        positions = []
        e, k = epoch, pack
        for _ in range(self.seqs):
            if k >= len(self.ds.plan(e)):
                e, k = e + 1, 0
            positions.append((e, k))
            k += 1
        mine = positions[self.dp_rank * self.n_micro * self.mbs : (self.dp_rank + 1) * self.n_micro * self.mbs]
        samples = [self.ds.build(self.ds.plan(pe)[pk]) for pe, pk in mine]
        micro = [
            micro_batch(samples[i : i + self.mbs], self.use_te, self.cp_size, self.cp_rank)
            for i in range(0, len(samples), self.mbs)
        ]
        if k >= len(self.ds.plan(e)):
            e, k = e + 1, 0
        return micro, (e, k), [s.document_lengths() for s in samples]


def batch_work(hf_cfg, lengths: list) -> tuple[float, float]:
    """Collective over data parallel: (real tokens, model FLOPs) of a global batch, from the
    document lengths of each rank's packs (``BatchStream.global_batch``)."""
    from megatron.core import parallel_state as ps

    local = [sum(int(np.sum(d)) for d in lengths), sum(model_flops(hf_cfg, d) for d in lengths)]
    work = torch.tensor(local, dtype=torch.float64, device=comm_device())
    if dist.is_initialized():  # the CP ranks of a group hold shares of the same packs: DP only
        dist.all_reduce(work, group=ps.get_data_parallel_group())
    return float(work[0]), float(work[1])


def evaluate(train_state, dataset, stream_args: dict, cfg: SFTConfig, loss_fn) -> float:
    stream = BatchStream(dataset, **stream_args)
    total = {"loss_sum": 0.0, "tokens": 0.0}
    pos = (0, 0)
    for _ in range(cfg.log.eval_batches):
        micro, pos, _ = stream.global_batch(*pos)
        rep = reduce_reports(forward_backward(train_state, micro, loss_fn, forward_only=True), total)
        for k in total:
            total[k] += rep[k]
        if pos[0] > 0:  # one pass over the validation set is enough
            break
    train_state.model.train()
    return total["loss_sum"] / max(total["tokens"], 1.0)


def check_model_fits(cfg: SFTConfig, hf_cfg: Qwen3Config) -> None:
    """The parallel layout divides the model, and a packed sequence fits its positions."""
    validate_parallel(hf_cfg, cfg.parallel.tp, cfg.parallel.pp)
    if cfg.data.seq_len > hf_cfg.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's "
            f"max_position_embeddings={hf_cfg.max_position_embeddings}"
        )


def dry_run(cfg: SFTConfig) -> None:
    """``--dry-run``: everything an SFT run checks before it trains, without starting anything."""
    d = cfg.data
    preflight(cfg, d.train + d.valid, d.generate)
    problem = writable_problem(Path(cfg.output_dir))
    if problem:
        raise ConfigError(f"output_dir {cfg.output_dir}: {problem}")
    world = DistEnv.from_environ().world_size
    cfg.batch_layout(cfg.parallel.data_parallel_size(world))
    hf_cfg = starting_config(cfg.model, may_be_missing=cfg.model.create_tiny is not None)
    if hf_cfg is not None:
        check_model_fits(cfg, hf_cfg)
    for path in d.train + d.valid:
        if Path(path).is_file():
            print(f"{path}: {check_sft_rows(path, d)}", flush=True)
        else:
            print(f"{path}: written by data.generate={d.generate} first; not read now", flush=True)
    if hf_cfg is None:
        print(f"model.hf={cfg.model.hf}: created by model.create_tiny first; not read now", flush=True)
    print(f"world size {world}: {cfg.batch_layout(cfg.parallel.data_parallel_size(world))[0]} sequences per step")


def train(cfg: SFTConfig) -> dict:
    """Run (or resume) SFT; returns the last step's metrics."""
    from megatron.core import parallel_state as ps

    par = cfg.parallel
    preflight(cfg, cfg.data.train + cfg.data.valid, cfg.data.generate)
    init_distributed(par, seed=cfg.seed)
    dp = ps.get_data_parallel_world_size()
    seqs, n_micro = cfg.batch_layout(dp)
    lock, resume = open_run(cfg)
    prepare_assets(cfg.model, cfg.data.generate, cfg.data.train, cfg.data.synthetic)
    hf_cfg, init_weights = model_source(cfg.model)
    check_model_fits(cfg, hf_cfg)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"

    def dataset(paths):
        align = 2 * par.context_parallel if par.context_parallel > 1 else 1
        # rank 0 builds the token cache (progress lines as it goes), the others then map it
        return rank0_first(
            lambda: SFTDataset(cfg.data, cfg.model.tokenizer_dir, paths, align), f"token cache of {', '.join(paths)}"
        )

    train_ds = dataset(cfg.data.train)
    valid_ds = dataset(cfg.data.valid) if cfg.data.valid else None
    steps_per_epoch = max(1, train_ds.packs_per_epoch() // seqs)
    total_steps = cfg.train_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    use_te = uses_transformer_engine(cfg.model)
    train_state = build_train_state(
        hf_cfg,
        cfg.model,
        cfg.optim,
        total_steps,
        init_weights=None if resume.candidates else init_weights,
        sequence_parallel=par.sequence_parallel,
    )
    state = {"step": 0, "data_epoch": 0, "data_pack": 0, "tokens": 0}
    resume_from = None
    if resume.candidates:
        resume_from, loaded = load_first(train_state, resume)
        state.update(loaded)
        if is_main():
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
    start_logs(cfg, state["step"] if resume_from else None)
    if is_main():
        print(
            f"SFT: {train_ds.stats()} | {seqs} sequences x {cfg.data.seq_len} tokens per step, "
            f"dp={dp} tp={par.tp} pp={par.pp} cp={par.context_parallel}, {n_micro} micro-batches per rank, "
            f"{total_steps} steps",
            flush=True,
        )

    loss_fn = nll_loss(hf_cfg.vocab_size, cfg.model.logprob_impl)
    stream_args = dict(
        seqs_per_batch=seqs,
        n_micro=n_micro,
        mbs=cfg.data.micro_batch_size,
        dp_rank=ps.get_data_parallel_rank(),
        use_te=use_te,
        cp=(ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()),
    )
    stream = BatchStream(train_ds, **stream_args)
    logger = MetricsLogger(
        out,
        total_steps,
        state["step"],
        tensorboard=cfg.log.tensorboard,
        wandb_project=cfg.log.wandb_project,
        run_name=out.name,
        config=to_dict(cfg),
        desc="sft",
    )
    metrics: dict = {}
    step = state["step"]

    def evaluate_now(at: int) -> bool:  # every eval_interval steps, before the first and after the last
        interval = cfg.log.eval_interval
        return valid_ds is not None and interval > 0 and (at % interval == 0 or at == total_steps)

    try:
        if step == 0 and evaluate_now(0):
            logger.log(0, {"val_loss": evaluate(train_state, valid_ds, stream_args, cfg, loss_fn)})
        while step < total_steps:
            t0 = time.time()
            micro, next_pos, lengths = stream.global_batch(state["data_epoch"], state["data_pack"])
            reports = forward_backward(train_state, micro, loss_fn)
            applied, grad_norm = optimizer_step(train_state)
            rep = reduce_reports(reports, ("loss_sum", "tokens"))
            loss = rep["loss_sum"] / max(rep["tokens"], 1.0)
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                stop_on_nonfinite(
                    out,
                    step + 1,
                    loss=loss,
                    grad_norm=grad_norm,
                    data_epoch=state["data_epoch"],
                    data_pack=state["data_pack"],
                )
            real_tokens, flops = batch_work(hf_cfg, lengths)  # padding counts for neither
            step += 1
            state.update(step=step, data_epoch=next_pos[0], data_pack=next_pos[1], tokens=state["tokens"] + real_tokens)
            dt = time.time() - t0
            world = dist.get_world_size()
            tok_s = real_tokens / dt
            metrics = {
                "loss": loss,
                "lr": train_state.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_s": tok_s,
                "tokens_per_s_per_device": tok_s / world,
                "step_time_s": dt,
                "supervised_tokens": rep["tokens"],
                "pack_fill": real_tokens / (seqs * cfg.data.seq_len),
                "epoch": state["data_epoch"],
                "skipped_update": not applied,
            }
            if cfg.log.peak_tflops:
                metrics["mfu"] = flops / dt / world / (cfg.log.peak_tflops * 1e12)
            if torch.cuda.is_available():
                metrics["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if evaluate_now(step):
                metrics["val_loss"] = evaluate(train_state, valid_ds, stream_args, cfg, loss_fn)
            logger.log(step, metrics, console=step % cfg.log.interval == 0 or step == total_steps)
            logger.advance()
            maybe_crash("step", step)
            if step % cfg.checkpoint.save_interval == 0 or step == total_steps:
                save_checkpoint(train_state, ckpt_root, step, state, cfg.checkpoint.keep_last, to_dict(cfg))
    finally:
        logger.close()
    if cfg.checkpoint.export_hf and is_main():
        sampling = {"temperature": EVAL_TEMPERATURE, "top_p": EVAL_TOP_P}
        export_hf(cfg.model.tokenizer_dir, ckpt_root, out / "hf", sampling)
    if dist.is_initialized():
        dist.barrier()
    if lock is not None:
        lock.release()
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    return run_config_entry(SFTConfig, train, __doc__, argv, dry_run, prog="python -m megatron_klear.sft")


if __name__ == "__main__":
    sys.exit(main())
