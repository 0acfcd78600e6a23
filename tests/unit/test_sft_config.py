"""SFT config checks and context-parallel batch shares, without a training job."""

from __future__ import annotations

import pytest

from megatron_klear.config import load_config
from megatron_klear.errors import ConfigError
from megatron_klear.sft.config import SFTConfig
from tests.jobs import ROOT


def test_bad_config_errors_name_the_field(tmp_path):
    cfgfile = ROOT / "examples/tiny/sft.yaml"
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        load_config(SFTConfig, cfgfile, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_config(SFTConfig, cfgfile, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="global_batch_tokens=1000 is not a multiple of data.seq_len=256"):
        load_config(SFTConfig, cfgfile, ["data.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="exactly one of model.hf"):
        load_config(SFTConfig, cfgfile, [f"model.load={tmp_path}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    cfg = load_config(SFTConfig, cfgfile, ["data.global_batch_tokens=768"])  # 3 sequences
    with pytest.raises(ConfigError, match="not divisible by data.micro_batch_size x data-parallel size = 2 x 2"):
        cfg.batch_layout(2)


def test_context_parallel_shares_are_load_balanced_and_keep_the_targets(tmp_path):
    """Each CP rank holds chunks r and 2cp-1-r of every document (Transformer Engine's THD
    layout, written out by hand here); the shares partition the sequence, and the NLL summed
    over the shares equals the NLL of the whole sequence (targets were shifted before the split)."""
    import numpy as np
    import torch

    from megatron_klear.data.sft import PackedSample
    from megatron_klear.training.batches import attention_inputs, context_parallel_index, micro_batch

    cu = np.array([0, 8, 12, 16], np.int32)
    assert context_parallel_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert context_parallel_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    with pytest.raises(ValueError, match=r"document \[0, 6\) is not a multiple of 2 x cp = 4"):
        context_parallel_index(np.array([0, 6, 16], np.int32), 2, 0)

    g = torch.Generator().manual_seed(0)
    vocab, L = 50, 32
    ids = torch.randint(0, vocab, (L,), generator=g).numpy()
    cu = np.array([0, 12, 20, 32], np.int32)
    labels, mask = np.zeros(L, np.int64), np.zeros(L, np.float32)
    for a, b in zip(cu[:-1], cu[1:]):
        labels[a : b - 1], mask[a + 3 : b - 1] = ids[a + 1 : b], 1.0
    pos = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    sample = PackedSample(ids, labels, mask, pos, cu)
    logits = torch.randn(1, L, vocab, generator=g, dtype=torch.float64)

    def loss(logits, mb):  # float64 reference NLL over the supervised tokens
        logp = torch.log_softmax(logits, -1).gather(-1, mb.labels[..., None])[..., 0]
        mask = mb.loss_mask.double()
        return -(logp * mask).sum(), mask.sum(), None

    full = micro_batch([sample], use_te=True)
    full.validate()
    whole, count, _ = loss(logits, full)
    parts, counts, seen = 0.0, 0, []
    for rank in range(2):
        share = micro_batch([sample], use_te=True, cp_size=2, cp_rank=rank)
        index = torch.from_numpy(context_parallel_index(cu, 2, rank))
        share.validate()  # a share: labels shifted within each chunk, boundaries against the whole row
        for k in ("input_ids", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(share, k), getattr(full, k)[:, index])
        thd = attention_inputs(share, use_te=True, device="cpu", causal_masks={})  # built as the step runs
        assert thd["attention_mask"] is None
        assert thd["packed_seq_params"].cu_seqlens_q.tolist() == cu.tolist()  # global boundaries
        part, n, _ = loss(logits[:, index], share)
        parts, counts, seen = parts + part, counts + n, seen + index.tolist()
    assert sorted(seen) == list(range(L))
    assert int(counts) == int(count) and torch.allclose(parts, whole, rtol=1e-12)
    with pytest.raises(ValueError, match="context parallel needs Transformer Engine"):
        micro_batch([sample], use_te=False, cp_size=2, cp_rank=0)


def test_scientific_notation_is_a_number():
    cfg = load_config(SFTConfig, ROOT / "examples/tiny/sft.yaml", ["optim.lr=1e-5", "optim.min_lr=1e-6"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.min_lr == 1e-6


def test_model_flops_count_attention_within_documents():
    """Hand count for a pack of documents [3, 5] (plus 2 padding tokens, not passed) on a model
    with hidden 4, 2 layers, 2 heads / 1 KV head of dim 2, FFN 6, vocabulary 10."""
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.shapes import qwen3_config_dict
    from megatron_klear.training.metrics import model_flops

    shape = dict(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    hf = Qwen3Config.from_dict(qwen3_config_dict("tiny", **shape, intermediate_size=6, vocab_size=10))
    # per token and layer: QKV 2*4*(4+2+2) = 64, output projection 2*4*4 = 32, SwiGLU 3 * 2*4*6 = 144
    # -> 240, x 2 layers = 480, + LM head 2*4*10 = 80: 560 per token, 8 real tokens: 4480
    # attention per layer and document: QK^T over d^2/2 causal pairs, each a dot product of
    # q_dim = 2 x 2 = 4 (8 FLOPs): 4 d^2; PV the same: 8 d^2. (9 + 25) x 8 = 272, x 2 layers = 544
    assert model_flops(hf, [3, 5]) == 3 * (4480 + 544)
    # the same 8 tokens as one document: 64 x 8 x 2 layers = 1024 of attention
    assert model_flops(hf, [8]) == 3 * (4480 + 1024)
