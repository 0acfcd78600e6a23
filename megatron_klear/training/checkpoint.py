"""Training checkpoints: model, optimizer, LR schedule, trainer state and RNG, atomically.

Layout under ``<output_dir>/checkpoints/``::

    iter_0000100/            a complete checkpoint (only complete ones carry this name)
      megatron_klear.json    marker, written last (see checkpoint.megatron_ckpt)
      config.json            the HF config of the model
      model/                 Megatron-Core dist checkpoint of model and optimizer (TP/PP-agnostic)
      trainer_state.json     the run state (training.run_state: step, data position, RL buffer,
                             versioned) and the LR schedule
      run_config.json        the run's config (a resume compares it with its own)
      rng/rank_00000.pt      each rank's RNG states
    latest                   name of the newest complete checkpoint
    .iter_0000200.tmp/       a save in progress (or one that crashed): never loaded

The model tensors of ``iter_N/`` are keyed as in a converted checkpoint, so
``tools/convert_megatron_to_hf.py --load iter_N`` exports it.

A resume takes the newest checkpoint that is complete and loads (``find_resumable``, then
``load_first``), saying which newer ones it skipped and why: a checkpoint damaged after it was
written (a missing or truncated file) never stops a run that has an intact older one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_klear.checkpoint.convert import megatron_to_hf
from megatron_klear.checkpoint.hf_io import copy_side_files
from megatron_klear.checkpoint.megatron_ckpt import (
    MARKER,
    barrier,
    checkpoint_problem,
    is_valid_checkpoint,
    load_sharded,
    load_state_checked,
    rank,
    save_sharded,
    write_marker,
)
from megatron_klear.distributed import broadcast_object, comm_device
from megatron_klear.errors import CheckpointError
from megatron_klear.training.guards import maybe_crash
from megatron_klear.training.run_state import RunState, rng_state, set_rng_state
from megatron_klear.training.state import TrainState

_ITER = re.compile(r"^iter_(\d{7})$")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _ITER.match(p.name) and is_valid_checkpoint(p)]
    return sorted(found, key=lambda p: int(_ITER.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


# "dp_reshardable": each rank saves its own optimizer buffers, fully in parallel; the optimizer
# state reshards over data parallelism only, so resuming needs the same TP x PP (the model
# weights themselves load at any layout). Megatron-Core 0.16's "fully_reshardable" format
# assumes apex/TE Adam and fails to load torch Adam's per-parameter step.
OPTIMIZER_FORMAT = "dp_reshardable"


def _optimizers(train_state: TrainState) -> list:
    """The Megatron optimizers behind the train state's (possibly chained) optimizer."""
    return getattr(train_state.optimizer, "chained_optimizers", [train_state.optimizer])


def _sharded_state(train_state: TrainState, is_loading: bool) -> dict:
    model_sd = train_state.module.sharded_state_dict()
    optim_sd = train_state.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_FORMAT}
    )
    return {"model": model_sd, "optimizer": optim_sd}


def _ensure_optimizer_state(train_state: TrainState) -> None:
    """Give a never-stepped optimizer the state a fresh Adam would create on its first step
    (step 0, zero moments), so a checkpoint can be saved before any update (an RL run whose
    first steps were all filtered). Unlike Megatron's dummy step this leaves the weights alone."""
    for opt in _optimizers(train_state):
        if opt.optimizer.state:
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }


def save_checkpoint(
    train_state: TrainState,
    root: Path,
    run_state: RunState,
    keep_last: int = 3,
    run_config: Optional[dict] = None,
) -> Path:
    """Collective: every rank must call it. Saves the train state and ``run_state`` (at its
    step; this rank's RNG states with it) and returns the checkpoint directory.

    ``run_config`` (the run's config as a mapping) is kept with the checkpoint, for a resume
    to compare with its own."""
    step = run_state.step
    name = f"iter_{step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter_*.tmp"):  # a crashed save: never complete, safe to drop
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "rng").mkdir()
    barrier()
    train_state.sync_params()
    _ensure_optimizer_state(train_state)
    save_sharded(_sharded_state(train_state, is_loading=False), tmp / "model")
    run_state.rng = rng_state()
    torch.save(run_state.rng, tmp / "rng" / f"rank_{rank():05d}.pt")
    maybe_crash("save", step)
    barrier()
    if rank() == 0:
        state = dict(run_state.to_json(), scheduler=train_state.scheduler.state_dict())
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=1))
        write_marker(tmp, train_state.hf_config, step=step)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (root / "latest.tmp").write_text(name)
        (root / "latest.tmp").rename(root / "latest")
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(train_state: TrainState, path: Path) -> RunState:
    """Load model, optimizer, schedule and this rank's RNG; returns the run state (migrated
    from an older version, or a ``CheckpointError`` naming a version this code cannot read)."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint")
    state_file = path / "trainer_state.json"
    try:
        trainer_state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file}: unreadable ({e})") from e
    run_state = RunState.from_json(trainer_state, state_file)  # before any tensor is touched
    # Before its first step the optimizer has no state to describe (torch Adam creates it
    # lazily), so Megatron cannot build the sharded state dict to load into. Megatron's own
    # helper takes one zero-gradient step to create it; the load overwrites all of it.
    for opt in _optimizers(train_state):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
    state = load_sharded(_sharded_state(train_state, is_loading=True), path)
    load_state_checked(train_state.module, state["model"], path)
    try:
        with torch.no_grad():  # fp32 models: main params are views of the (grad-requiring) weights
            train_state.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model and layout ({e!r})") from e
    # Megatron-Core 0.16 without apex/TE keeps the true Adam step count in the param groups but
    # leaves each parameter's torch-Adam "step" at the placeholder value (and shared between
    # parameters), so the bias correction would be wrong from the first resumed step.
    for opt in _optimizers(train_state):
        for group in opt.optimizer.param_groups:
            if "step" in group:
                for p in group["params"]:
                    if "step" in opt.optimizer.state.get(p, {}):
                        opt.optimizer.state[p]["step"] = torch.tensor(float(group["step"]))
    train_state.scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank_{rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming on a different world size
        run_state.rng = torch.load(rng_file, weights_only=False)
        set_rng_state(run_state.rng)
    return run_state


def export_hf(tokenizer_src: str, root: Path, out: Path, sampling: dict) -> Path:
    """Export the newest checkpoint under ``root`` to an HF directory (tokenizer included) whose
    generation_config.json samples with ``sampling`` (temperature, top_p[, top_k]) and stops at
    the end of a chat turn."""

    last = latest_checkpoint(root)
    if last is None:
        raise CheckpointError(f"no complete checkpoint under {root} to export")
    copy_side_files(tokenizer_src, last)
    megatron_to_hf(str(last), str(out), force=True, sampling=sampling)
    print(f"exported {last} -> {out}", flush=True)
    return Path(out)


# --- resume ------------------------------------------------------------------------------------

RUN_CONFIG = "run_config.json"


@dataclass
class Resume:
    """The checkpoints a resume may load, newest first, and those it skipped with why."""

    candidates: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def saved_config(self) -> Optional[dict]:
        """The run config kept with the newest candidate (None: an older checkpoint without one)."""
        f = self.candidates[0] / RUN_CONFIG if self.candidates else None
        return json.loads(f.read_text()) if f is not None and f.is_file() else None


def _problem(path: Path) -> Optional[str]:
    problem = checkpoint_problem(path)
    if problem is None and not (path / "trainer_state.json").is_file():
        problem = f"{path / 'trainer_state.json'} is missing"
    return problem


def find_resumable(root: Path) -> Resume:
    """Collective: the checkpoints under ``root`` whose files are all there, newest first; rank 0
    checks (metadata only) and says which newer ones it skips and why.

    Raises when there are checkpoints but none of them is intact (a fresh start would overwrite
    them: that takes ``checkpoint.resume=false``)."""
    res = Resume()
    if rank() == 0 and root.is_dir():
        dirs = sorted((p for p in root.iterdir() if _ITER.match(p.name)), key=lambda p: p.name, reverse=True)
        for p in dirs:
            problem = _problem(p)
            if problem is None:
                res.candidates.append(p)
            else:
                res.skipped.append((p, problem))
        for p, why in res.skipped:
            if not res.candidates or p.name > res.candidates[0].name:
                print(f"resume: skipping {p.name}: {why}", flush=True)
    res = broadcast_object(res)
    if res.skipped and not res.candidates:
        detail = "; ".join(f"{p.name}: {why}" for p, why in res.skipped)
        raise CheckpointError(
            f"no loadable checkpoint under {root} ({detail}); "
            "set checkpoint.resume=false to start afresh (it overwrites them)"
        )
    return res


def load_first(train_state: TrainState, resume: Resume) -> tuple[Path, RunState]:
    """Collective: load the newest candidate that loads on every rank; returns (its path, its
    run state). A candidate that fails is skipped with its reason; when all fail, the
    newest one's error is raised."""
    first_error: Optional[CheckpointError] = None
    for path in resume.candidates:
        try:
            state, error = load_checkpoint(train_state, path), None
        except CheckpointError as e:
            state, error = None, e
        ok = torch.tensor([0.0 if error else 1.0], device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank takes the same checkpoint
        if ok.item() == 1.0:
            return path, state
        first_error = first_error or error or CheckpointError(f"{path}: failed to load on another rank")
        if rank() == 0:
            print(f"resume: skipping {path.name}: {error or 'failed to load on another rank'}", flush=True)
    assert first_error is not None, "load_first needs at least one candidate"
    raise first_error
