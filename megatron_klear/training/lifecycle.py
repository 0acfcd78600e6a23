"""One run's life, the same for SFT and RL: ``TrainingRun``, a context manager.

    with SFTRun(cfg) as run:    # or RLRun
        run.train()

Entering opens the run, in this order (an exact resume depends on it: the model's
initialisation draws from the RNG that the process groups seed, and a resume restores the RNG
after the model is built):

  1. checks      ``preflight``: optional packages, the starting model, the data files;
  2. groups      the process groups (``init_distributed``), then the run's own layout checks;
  3. lock        the output directory is this run's (``open_run``: an error naming the live
                 holder otherwise) and the checkpoints a resume may load are known;
  4. assets      the tiny model and synthetic data a config asks for; the model source;
                 the run's data (``load_data``);
  5. train state model, optimizer and LR schedule (``build_train_state``);
  6. resume      the newest checkpoint that loads on every rank, falling back past damaged
                 ones (``load_first``), into the typed run state (``training.run_state``);
  7. logs        ``config.json``, metric rows cut back to the resumed step, the metrics logger;
                 then the run's own start (``started``: an inference engine, a data stream).

Between steps the loop asks ``stop_requested``: a file ``output_dir/stop_requested`` (the Slurm
launcher writes it when the job's time limit nears, on ``--signal=B:USR1@...``; anyone may touch
it) makes the run checkpoint that step, write ``output_dir/stopped.json`` (the step and why),
remove the request and return: a stopped run is not finished, so it is not exported, and the
next start resumes exactly there (the launcher requeues the job).

Leaving, however the run ends: the logs are flushed and closed, the run's resources are
closed (``closing``: engine servers stopped); after a run that ended well, the HF export of
the last checkpoint (rank 0) and a barrier; and in every case the output directory's lock is
released. Every method here is collective: every rank calls it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_klear.config import to_dict
from megatron_klear.data.synthetic import SyntheticDataConfig
from megatron_klear.distributed import broadcast_object, init_distributed, is_main
from megatron_klear.models.config import Qwen3Config
from megatron_klear.training.checkpoint import Resume, export_hf, load_first, save_checkpoint
from megatron_klear.training.metrics import MetricsLogger
from megatron_klear.training.run import RunConfig, model_source, preflight, prepare_assets
from megatron_klear.training.run_state import RunState
from megatron_klear.training.rundir import RunLock, open_run, start_logs
from megatron_klear.training.state import TrainState, build_train_state

STOP_FILE = "stop_requested"  # in output_dir: checkpoint and stop at the next step boundary
STOPPED_FILE = "stopped.json"  # in output_dir: the run stopped on request at this step (not finished)


@dataclass
class RunInputs:
    """What a run reads before it starts: checked by ``preflight``, written first when the
    config generates them."""

    files: list[str]  # every data file preflight checks
    generate: Optional[str] = None  # data.generate: write synthetic data here when train_files are missing
    train_files: list[str] = field(default_factory=list)  # the files data.generate provides
    synthetic: Optional[SyntheticDataConfig] = None
    model_will_exist: bool = False  # an earlier stage writes model.hf (bootstrap)


class TrainingRun:
    """The run lifecycle (module docstring); ``SFTRun`` and ``RLRun`` fill in the hooks."""

    kind = "train"  # the progress bar's label

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.state = RunState()
        self.resumed_from: Optional[Path] = None
        self.lock: Optional[RunLock] = None
        self.logger: Optional[MetricsLogger] = None
        self.hf_cfg: Optional[Qwen3Config] = None
        self.train_state: Optional[TrainState] = None
        self.rank0 = False
        self.saved_step = -1  # the step of the last checkpoint this process wrote
        self.stopped = False  # stopped on request (stop_requested): not finished, not exported

    # -- hooks ---------------------------------------------------------------------------
    def inputs(self) -> RunInputs:
        """The data files the run reads (and whether the config generates them)."""
        raise NotImplementedError

    def check_environment(self) -> None:
        """On every rank before the process groups: what the run needs beside its own files
        (RL: the rollout Python's torch and the engines' GPUs)."""

    def check_layout(self) -> None:
        """After the process groups exist, before the lock: layout checks (batch divisibility)."""

    def check_model(self, hf_cfg: Qwen3Config) -> None:
        """The starting model fits the config (parallel layout, sequence lengths)."""

    def load_data(self) -> None:
        """The run's data (datasets, prompts), after the model source and before the train state."""

    def total_steps(self) -> int:
        """The run's length in steps (the LR schedule's default decay length)."""
        raise NotImplementedError

    def started(self) -> None:
        """After the resume and the logs: what the run needs to train (engine, data stream)."""

    def closing(self) -> None:
        """However the run ends, before the export: release what ``started`` acquired."""

    def export_sampling(self) -> dict:
        """The sampling settings an exported model's generation_config.json carries."""
        raise NotImplementedError

    # -- the lifecycle -------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps completed."""
        return self.state.step

    def __enter__(self) -> "TrainingRun":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(ok=exc_type is None)
        return False

    def open(self) -> None:
        """Steps 1 to 7 of the module docstring; on any failure, what was opened is closed."""
        cfg, inputs = self.cfg, self.inputs()
        preflight(cfg, inputs.files, inputs.generate, model_will_exist=inputs.model_will_exist)
        self.check_environment()
        init_distributed(cfg.parallel, seed=cfg.seed)
        self.rank0 = is_main()
        self.check_layout()
        self.lock, resume = open_run(cfg)
        try:
            if self.rank0:
                (self.out / STOPPED_FILE).unlink(missing_ok=True)  # this start continues that run
            prepare_assets(cfg.model, inputs.generate, inputs.train_files, inputs.synthetic)
            self.hf_cfg, init_weights = model_source(cfg.model)
            self.check_model(self.hf_cfg)
            self.load_data()
            self.train_state = build_train_state(
                self.hf_cfg,
                cfg.model,
                cfg.optim,
                self.total_steps(),
                init_weights=None if resume.candidates else init_weights,
                sequence_parallel=cfg.parallel.sequence_parallel,
            )
            self.resume(resume)
            start_logs(cfg, self.step if self.resumed_from else None)
            self.logger = MetricsLogger(
                self.out,
                self.total_steps(),
                self.step,
                tensorboard=cfg.log.tensorboard,
                wandb=cfg.log.wandb(),
                run_name=self.out.name,
                config=to_dict(cfg),
                desc=self.kind,
            )
            self.started()
        except BaseException:
            self.close(ok=False)
            raise

    def resume(self, resume: Resume) -> None:
        """Load the newest checkpoint that loads everywhere (falling back past damaged ones)."""
        if not resume.candidates:
            return
        self.resumed_from, self.state = load_first(self.train_state, resume)
        if self.rank0:
            print(f"resumed from {self.resumed_from} at step {self.step}", flush=True)

    def save(self) -> None:
        """A checkpoint of the train state and the run state at this step."""
        ck = self.cfg.checkpoint
        save_checkpoint(self.train_state, self.ckpt_root, self.state, ck.keep_last, to_dict(self.cfg))
        self.saved_step = self.step

    def save_on_interval(self) -> None:
        """A checkpoint every ``checkpoint.save_interval`` steps and after the last one."""
        if self.step % self.cfg.checkpoint.save_interval == 0 or self.step == self.total_steps():
            self.save()

    def stop_requested(self) -> bool:
        """Collective, between steps: True when ``output_dir/stop_requested`` exists, after this
        step is checkpointed (unless it just was), ``stopped.json`` written and the request
        removed (module doc); the loop then returns."""
        if not broadcast_object(self.rank0 and (self.out / STOP_FILE).exists()):
            return False
        if self.saved_step != self.step:
            self.save()
        if self.rank0:
            request = self.out / STOP_FILE
            why = request.read_text().strip() if request.exists() else ""
            record = {"step": self.step, "time": round(time.time(), 3), "why": why or "stop requested"}
            (self.out / STOPPED_FILE).write_text(json.dumps(record) + "\n")
            request.unlink(missing_ok=True)
            print(f"stopped at step {self.step} on request ({record['why']}); checkpoint saved, resume to go on",
                  flush=True)  # fmt: skip
        self.stopped = True
        if dist.is_initialized():
            dist.barrier()
        return True

    def log(self, metrics: dict) -> None:
        """The step's row (a console line every ``log.interval`` steps and after the last)."""
        last = self.step == self.total_steps()
        self.logger.log(self.step, metrics, console=self.step % self.cfg.log.interval == 0 or last)
        self.logger.advance()

    def close(self, ok: bool) -> None:
        """Logs closed and the run's resources released however it ended; the HF export after
        a run that ended well; the output directory's lock released in every case."""
        try:
            if self.logger is not None:
                self.logger.close()
            self.closing()
            if ok and not self.stopped:
                self.export()
        finally:
            if self.lock is not None:
                self.lock.release()

    def export(self) -> None:
        """The HF export of the last checkpoint (rank 0), then a barrier."""
        if self.cfg.checkpoint.export_hf and self.rank0:
            export_hf(self.cfg.model.tokenizer_dir, self.ckpt_root, self.out / "hf", self.export_sampling())
        if dist.is_initialized():
            dist.barrier()
