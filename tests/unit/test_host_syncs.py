"""Loss metrics stay on the device: one RL micro-batch (forward, GPPO + SFT-on-correct loss
with every metric, backward) and one SFT micro-batch read at most one tensor on the host
outside debug mode (Megatron's once-per-schedule gradient scaling by the token count), however
many micro-batches the step has, and the reports of all of an optimizer step's micro-batches
reach the host in one transfer."""

from __future__ import annotations

import torch

from megatron_klear.distributed import spawn
from tests.dist_workers import host_sync_worker


def test_at_most_one_host_sync_per_micro_batch(hf_models, tmp_path):
    out = str(tmp_path / "syncs")
    spawn(host_sync_worker, 1, str(hf_models["gqa4_untied"]), out)
    r = torch.load(f"{out}.0", weights_only=False)
    n = r["micro_batches"]
    assert n > 1
    for loss in ("rl", "sft"):
        for micro in (1, n):
            count, where = r["0", loss, micro]
            assert count <= 1, f"{loss}, {micro} micro-batches:\n" + "\n".join(where)
        # the counter sees syncs: debug mode validates every micro-batch and its targets on the host
        assert r["1", loss, n][0] > r["1", loss, 1][0] > 1
    assert r["on_device"]
    assert r["reduce"] == 1  # the whole optimizer step's reports, read once
    assert r["reduced"]["tokens"] > 0 and r["reduced"]["nonfinite"] == 0
