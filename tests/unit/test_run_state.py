"""The typed, versioned run state: round trip, migration of version 1 (SFT and RL, with an RL
buffer of the first schema), and refusals that name the version or the field."""

from __future__ import annotations

import json

import pytest

from megatron_klear.checkpoint.megatron_ckpt import MARKER
from megatron_klear.errors import CheckpointError
from megatron_klear.rl.rollout import BUFFER_SCHEMA, Sample, groups_from_rows, groups_to_rows
from megatron_klear.training.checkpoint import load_checkpoint
from megatron_klear.training.run_state import RUN_STATE_VERSION, DataPosition, RunState


def _sample(**kw) -> Sample:
    return Sample("u", [1, 2], [3, 4], [-0.5, -0.25], "stop", 1.0, True, "ok", 0.5, **kw)


def test_round_trip_of_the_current_version():
    rows = groups_to_rows([[_sample(weight_version=6), _sample(weight_version=6)]])
    state = RunState(step=7, position=DataPosition(2, 13), tokens=123.0, buffer=rows, buffer_schema=BUFFER_SCHEMA)
    saved = json.loads(json.dumps(state.to_json()))  # what trainer_state.json holds
    assert saved["version"] == RUN_STATE_VERSION == 2 and "rng" not in saved
    back = RunState.from_json(saved, "x")
    assert back == state
    [[a, b]] = groups_from_rows(back.buffer, back.buffer_schema, back.step)
    assert a == _sample(weight_version=6) and b.weight_version == 6
    back.advance(DataPosition(3, 0), tokens=7.0)
    assert (back.step, back.position, back.tokens) == (8, DataPosition(3, 0), 130.0)


def test_version_1_of_sft_and_rl_migrates():
    sft = RunState.from_json({"step": 4, "data_epoch": 1, "data_pack": 9, "tokens": 512.0, "scheduler": {}}, "x")
    assert (sft.step, sft.position, sft.tokens, sft.buffer, sft.buffer_schema) == (4, DataPosition(1, 9), 512.0, [], 0)
    old_sample = {k: v for k, v in json.loads(json.dumps(groups_to_rows([[_sample()]])))[0][0].items()}
    del old_sample["weight_version"]
    old_sample["stale"] = True  # schema 1: every buffered sample was stale
    v1 = {"step": 3, "prompt_epoch": 0, "prompt_index": 12, "buffer": [[old_sample]], "scheduler": {}}
    rl = RunState.from_json(v1, "x")
    assert (rl.step, rl.position, rl.buffer_schema) == (3, DataPosition(0, 12), 1)
    [[s]] = groups_from_rows(rl.buffer, rl.buffer_schema, rl.step)
    # generated for step 3 by the weights of step 2: stale for the policy of step 4 (version 3)
    assert s.weight_version == 2 and s.response_ids == [3, 4] and s.advantage == 0.5


def test_unknown_versions_and_fields_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="run-state version 3 is not one this megatron_klear reads"):
        RunState.from_json({"version": 3, "step": 1}, "ckpt/trainer_state.json")
    with pytest.raises(CheckpointError, match=r"run-state version 2 lacks \['buffer', 'buffer_schema'\]"):
        RunState.from_json({"version": 2, "step": 1, "position": {"epoch": 0, "index": 0}, "tokens": 0}, "x")
    rows = groups_to_rows([[_sample()]])
    with pytest.raises(CheckpointError, match="RL buffer schema 9 is not one"):
        groups_from_rows(rows, 9, 1)
    renamed = [[{("adv" if k == "advantage" else k): v for k, v in rows[0][0].items()}]]
    with pytest.raises(CheckpointError, match=r"fields \['adv'\] it should not have and lacks \['advantage'\]"):
        groups_from_rows(renamed, BUFFER_SCHEMA, 1)
    # a checkpoint of a newer run state stops the resume before any tensor is read
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / MARKER).write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"version": 5, "step": 1}))
    with pytest.raises(CheckpointError, match="trainer_state.json: run-state version 5"):
        load_checkpoint(None, ckpt)
