"""Weight gathering for the rollout engines: exact HF tensors from any TP x PP, bounded buckets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_klear.checkpoint.convert import hf_to_megatron
from megatron_klear.distributed import spawn
from tests.dist_workers import gather_worker, overlap_save_worker, sync_worker


@pytest.mark.parametrize("name,tp,pp", [("gqa4_tied", 2, 2), ("gqa1_untied", 2, 2), ("gqa4_untied", 1, 1)])
def test_gathered_weights_equal_the_hf_checkpoint(name, tp, pp, hf_models, tmp_path):
    ck = tmp_path / "ck"
    hf_to_megatron(str(hf_models[name]), str(ck), tp=1, pp=1)
    bucket_bytes = 40_000
    out = tmp_path / "buckets.pt"
    spawn(gather_worker, tp * pp, tp, pp, str(ck), bucket_bytes, str(out))
    buckets = torch.load(out)
    ref = load_file(hf_models[name] / "model.safetensors")
    got = {}
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= bucket_bytes or len(b) == 1, f"bucket of {size} bytes over the {bucket_bytes} limit"
        for n, t in b:
            assert n not in got, f"{n} sent twice"
            got[n] = t
    assert sorted(got) == sorted(ref)  # tied embeddings sent once, no lm_head
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    assert len(buckets) > 1


def test_sync_into_hf_engine_after_training_tp2_pp2(hf_models, tmp_path):
    """After optimizer steps at TP2 x PP2: every engine parameter equals the trainer's, the
    log-probs agree on the probe's real tokens (its forward padded to a multiple of TP), a noisy
    probe is taken again before anything fails, an engine without the trainer's weights fails
    the probe and its re-probe, a sync into an engine of another shape fails on every rank, and an
    engine whose memory was released takes back its KV cache only once the trainer's cache was
    freed behind the sync's buckets (audit fix 1, the RL loop's ``sync_into_engine``)."""
    out = str(tmp_path / "sync")
    spawn(sync_worker, 4, 2, 2, str(hf_models["gqa4_untied"]), str(hf_models["gqa1_untied"]), out)
    results = [torch.load(f"{out}.{r}") for r in range(4)]
    r0 = results[0]
    assert sorted(r0["engine"]) == sorted(r0["ref"])
    changed = 0
    for n, t in r0["engine"].items():
        assert torch.equal(t, r0["ref"][n]), n
        changed += not torch.equal(t, r0["before"][n])
    assert changed >= len(r0["engine"]) - 2, "training should have moved (almost) every tensor"
    assert r0["version"] == "step-3" and r0["buckets"] > 1
    for r in results:  # every rank agrees on the probe and on the failure
        assert r["diff"] == r0["diff"] and r["diff"] < 1e-4
        assert r["probe_lengths"] == [18] * 4, "4 sequences; each 17-token one runs padded to a multiple of TP=2"
        assert r["failure"] is not None and "engine shape" in r["failure"]
        # one noisy probe does not fail the sync: the re-probe (other seeds) decides
        assert r["reprobed"] == r0["reprobed"] and r["reprobed"] < 1e-4
        # weights that did not arrive fail the probe and its re-probe, both named
        assert r["off"] is not None and "on a re-probe" in r["off"] and "(mean over 4 x 4 sampled tokens)" in r["off"]
    assert r0["noisy_calls"] == 2
    # rollout.release_memory: the engine's weights come back after every rank freed its CUDA
    # cache, and its KV cache and CUDA graphs only after the sync's buckets were freed again
    order = r0["memory_order"]
    assert order[:2] == ["free", ("resume", "weights")] and order[-2:] == ["free", ("resume", "kv_cache", "cuda_graph")]
    assert set(order[2:-2]) == {"bucket"} and len(order[2:-2]) == r0["buckets"]
    assert all(r["memory_order"] == ["free", "free"] for r in results[1:])
    assert r0["wrong_stale"]


def test_checkpoint_after_an_overlapped_step_holds_the_update(hf_models, tmp_path):
    """With overlap_param_gather a step updates only each DP rank's shard until the next forward.
    A save reads the parameters outside any forward: it must gather first (TrainState.sync_params)."""
    out = str(tmp_path / "r")
    spawn(overlap_save_worker, 2, str(hf_models["gqa4_untied"]), str(tmp_path / "ck"), out)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["stale"] > 0, "the other rank's shard was current before the save gathered it"
        assert r["saved_equal"], "the checkpoint holds weights from before the step"
