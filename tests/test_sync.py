"""Weight gathering for the rollout engines: exact HF tensors from any TP x PP, bounded buckets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_klear.checkpoint.convert import hf_to_megatron
from megatron_klear.launch import spawn
from tests.dist_workers import gather_worker


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
