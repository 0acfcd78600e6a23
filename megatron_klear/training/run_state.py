"""The run state: what a checkpoint restores besides the train state, typed and versioned.

``RunState`` is the same for SFT and RL: the step, the data position (SFT: epoch and pack; RL:
epoch and prompt), the tokens trained on, the RL buffer of groups generated for a later step
(rows in the RL rollout module's schema, with that schema's version) and, at save and load, this
rank's RNG states. ``trainer_state.json`` holds ``to_json()`` (plus the LR schedule, which
``training.checkpoint`` adds) under ``"version"``; the RNG states go to ``rng/rank_NNNNN.pt``.

Versions: 1 is the untyped dict of the first releases (``data_epoch`` / ``data_pack`` or
``prompt_epoch`` / ``prompt_index``, ``buffer`` of sample dicts, no ``version`` key); 2 is this
one. ``from_json`` migrates 1 to 2 and refuses any other version, naming it. A change of the
fields is a new version with a migration here, never a silent default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_klear.errors import CheckpointError

RUN_STATE_VERSION = 2
_FIELDS = ("version", "step", "position", "tokens", "buffer", "buffer_schema")


@dataclass
class DataPosition:
    """Where the next batch starts: an epoch of the (shuffled) data and an index within it."""

    epoch: int = 0
    index: int = 0  # SFT: pack of the epoch's plan; RL: prompt of the epoch's order


@dataclass
class RunState:
    """Everything but the train state that a resumed run must continue from."""

    step: int = 0  # steps completed (SFT: optimizer updates; RL: RL steps)
    position: DataPosition = field(default_factory=DataPosition)
    tokens: float = 0.0  # real tokens trained on so far (SFT)
    # RL: groups generated but not trained on yet, as rows of the RL buffer schema
    # (``rl.rollout.groups_to_rows``); empty for SFT
    buffer: list = field(default_factory=list)
    buffer_schema: int = 0  # the schema version of ``buffer``'s rows (0: no rows)
    rng: Optional[dict] = field(default=None, repr=False)  # this rank's RNG states, at save / load only

    def advance(self, position: DataPosition, tokens: float = 0.0) -> None:
        """One more step done; the next batch starts at ``position``."""
        self.step += 1
        self.position = position
        self.tokens += tokens

    def to_json(self) -> dict:
        """The ``trainer_state.json`` fields (no RNG: it is saved per rank)."""
        return {
            "version": RUN_STATE_VERSION,
            "step": self.step,
            "position": {"epoch": self.position.epoch, "index": self.position.index},
            "tokens": self.tokens,
            "buffer": self.buffer,
            "buffer_schema": self.buffer_schema,
        }

    @classmethod
    def from_json(cls, saved: dict, source: Path | str) -> "RunState":
        """The run state of ``saved`` (read from ``source``), migrated from an older version;
        a version this code does not know is a ``CheckpointError`` naming it."""
        version = saved.get("version", 1)
        if version == 1:
            saved = _migrate_v1(saved)
        elif version != RUN_STATE_VERSION:
            raise CheckpointError(
                f"{source}: run-state version {version!r} is not one this megatron_klear reads "
                f"(1 to {RUN_STATE_VERSION}); resume it with the version that wrote it"
            )
        missing = [k for k in _FIELDS if k not in saved]
        if missing:
            raise CheckpointError(f"{source}: run-state version {version} lacks {missing}")
        pos = saved["position"]
        return cls(
            step=int(saved["step"]),
            position=DataPosition(int(pos["epoch"]), int(pos["index"])),
            tokens=float(saved["tokens"]),
            buffer=list(saved["buffer"]),
            buffer_schema=int(saved["buffer_schema"]),
        )


def _migrate_v1(saved: dict) -> dict:
    """Version 1 (an untyped dict; SFT and RL named the data position differently) -> 2. Its RL
    buffer rows are the first buffer schema (sample dicts marked ``stale``)."""
    if "prompt_epoch" in saved:
        position = {"epoch": saved["prompt_epoch"], "index": saved["prompt_index"]}
    else:
        position = {"epoch": saved.get("data_epoch", 0), "index": saved.get("data_pack", 0)}
    buffer = saved.get("buffer") or []
    return {
        "version": RUN_STATE_VERSION,
        "step": saved["step"],
        "position": position,
        "tokens": saved.get("tokens", 0.0),
        "buffer": buffer,
        "buffer_schema": 1 if buffer else 0,
    }


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: Python, NumPy, torch (CPU and CUDA) and Megatron's tracker."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(state["tracker"])
