"""Qwen3-MoE weight sync at EP=2 into a REAL SGLang 0.5.23 server on CPU (its CPU engine serves
Qwen3MoeForCausalLM): both sync modes, each followed by the probe check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_klear.distributed import spawn
from tests.dist_workers import moe_sglang_worker
from tests.sglang_real import cpu_engine_config

pytestmark = [pytest.mark.real_sglang, pytest.mark.timeout(900)]


def test_moe_sync_into_real_sglang_at_ep2(moe_models, tmp_path):
    """Each rank holds half the experts. Before the first sync the server's log-probs are the
    untrained model's (the probe sees it); after a distributed (gloo broadcast) sync and after a
    colocated sync (both ranks build the buckets, the experts broadcast over the EP group) the
    server's sampled-token log-probs equal the trainer's within 2e-3, as before any training."""
    cfg = cpu_engine_config(moe_models["moe"], tmp_path / "logs", replicas=1)
    out = str(tmp_path / "r")
    spawn(moe_sglang_worker, 2, str(moe_models["moe"]), dataclasses.asdict(cfg), out)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    r0 = results[0]
    # SGLang's CPU MoE path is not the trainer's float32 arithmetic: with the same weights the
    # probe differs by ~2e-4 (measured), after the training steps by up to ~1e-3; an unsynced
    # server by ~0.1. The limit is the dense real-server check's (2e-3).
    assert r0["initial"] < 2e-3
    assert r0["before_sync"] > 2e-2, "the trainer moved: an unsynced server must show it"
    assert r0["distributed"] < 2e-3 and r0["colocated"] < 2e-3
    assert r0["buckets"] > 1 and r0["colocated_buckets"] > 1
    assert all(r[k] == r0[k] for r in results for k in ("before_sync", "distributed", "colocated"))
    log = (tmp_path / "logs" / "server_0.log").read_text()
    assert "/update_weights_from_distributed" in log and "/update_weights_from_tensor" in log
