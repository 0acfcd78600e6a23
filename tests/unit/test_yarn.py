"""YaRN in the trainer, against transformers' Qwen3 (the reference), past the original context.

Megatron-Core 0.16.1's ``YarnRotaryEmbedding`` gives transformers' cos / sin tables bit for bit
once our resolved values are passed (``test_megatron_yarn_tables_equal_transformers``), so the
model uses it; the logits test then checks the whole model at TP=2, on a packed row, after a
conversion, through the weight sync and the probe, and Megatron's THD RoPE under context
parallel = 2.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_klear.distributed import spawn
from megatron_klear.errors import ConfigError
from megatron_klear.models.config import Qwen3Config, YarnScaling, load_hf_config, read_rope, with_rope_scaling
from megatron_klear.models.qwen3 import ModelOptions, transformer_config
from megatron_klear.models.shapes import qwen3_config_dict
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from tests.dist_workers import yarn_worker
from tests.references import hf_logits

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# (rope_parameters, the YarnScaling we must read from them)
TABLE_CASES = [
    (dict(rope_type="yarn", factor=2.5, original_max_position_embeddings=32768), YarnScaling(2.5, 32768)),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=8, beta_slow=2),
     YarnScaling(4.0, 16, beta_fast=8.0, beta_slow=2.0)),
    (dict(rope_type="yarn", factor=2.5, original_max_position_embeddings=32768, truncate=False),
     YarnScaling(2.5, 32768, truncate=False)),
    (dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.5),
     YarnScaling(3.0, 4096, mscale=0.707, mscale_all_dim=0.5)),
]  # fmt: skip


def hf_rope(rope: dict, head_dim: int, positions: int, max_positions: int = 40960):
    """transformers' Qwen3 (cos, sin) for positions 0..positions-1, and its attention scaling."""
    from transformers import Qwen3Config as HFQwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf = HFQwen3Config(
        head_dim=head_dim,
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        rope_parameters={**rope, "rope_theta": 1e6},
    )
    emb = Qwen3RotaryEmbedding(hf)
    cos, sin = emb(torch.zeros(1, positions, head_dim), torch.arange(positions)[None])
    return cos[0], sin[0], emb.attention_scaling


def megatron_rope(scaling: YarnScaling, head_dim: int, positions: int):
    """Megatron's YaRN (cos, sin) as its unfused RoPE applies them, built from the fields our
    ``transformer_config`` sets."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
        _yarn_get_concentration_factor_from_config,
    )

    from megatron_klear.compat import install_cpu_compat

    install_cpu_compat()
    cfg = Qwen3Config.from_dict(qwen3_config_dict("tiny", "float32", head_dim=head_dim), "cfg")
    cfg = Qwen3Config(**{**cfg.__dict__, "rope_scaling": scaling})
    tc = transformer_config(cfg, 1, 1, ModelOptions(use_te=False))
    emb = YarnRotaryEmbedding(
        head_dim,
        rotary_base=1_000_000,
        use_cpu_initialization=True,
        scaling_factor=tc.yarn_rotary_scaling_factor,
        original_max_position_embeddings=tc.yarn_original_max_position_embeddings,
        beta_fast=tc.yarn_beta_fast,
        beta_slow=tc.yarn_beta_slow,
        mscale=tc.yarn_mscale,
        mscale_all_dim=tc.yarn_mscale_all_dim,
        correction_range_round_to_int=tc.yarn_correction_range_round_to_int,
    )
    freqs = emb(positions)[0][:, 0, 0]
    scale = _yarn_get_concentration_factor_from_config(tc)
    return torch.cos(freqs) * scale, torch.sin(freqs) * scale, scale, tc


@pytest.mark.parametrize("rope,expected", TABLE_CASES)
def test_megatron_yarn_tables_equal_transformers(rope, expected):
    """Bit for bit, to 3x the original context; plain RoPE differs (the test can fail)."""
    cfg = {**qwen3_config_dict("tiny", "float32", head_dim=128), "rope_parameters": {**rope, "rope_theta": 1e6}}
    theta, scaling = read_rope(cfg)
    assert (theta, scaling) == (1e6, expected)
    n = 3 * scaling.original_max_position_embeddings if scaling.original_max_position_embeddings < 5000 else 100_000
    cos, sin, attention_scaling = hf_rope(rope, 128, n)
    mcos, msin, mscale, tc = megatron_rope(scaling, 128, n)
    assert scaling.attention_factor == attention_scaling == mscale
    assert torch.equal(cos, mcos) and torch.equal(sin, msin)
    assert not tc.apply_rope_fusion
    plain_cos, _, _ = hf_rope({"rope_type": "default"}, 128, n)
    assert (plain_cos - cos).abs().max() > 0.1


def test_rope_keys_are_read_as_transformers_reads_them():
    base = qwen3_config_dict("tiny", "float32", max_positions=40960)
    # the legacy key wins over rope_parameters, as in transformers
    legacy = {**base, "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192},
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}  # fmt: skip
    # ... and then rope_theta comes from the top level
    assert read_rope(legacy) == (1e6, YarnScaling(2.0, 8192))
    # beta 0 means the default; a top-level original_max_position_embeddings wins
    rope = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 1, "beta_fast": 0}
    top_level = {**base, "original_max_position_embeddings": 10240, "rope_parameters": rope}
    assert read_rope(top_level)[1] == YarnScaling(4.0, 10240)
    # no original given: max_position_embeddings
    no_original = {"rope_type": "yarn", "factor": 2.0}
    assert read_rope({**base, "rope_parameters": no_original})[1].original_max_position_embeddings == 40960
    assert read_rope(base) == (1e6, None)
    paper = {**YARN, "factor": 2.5, "original_max_position_embeddings": 32768}
    cfg = Qwen3Config.from_dict({**base, "rope_parameters": paper})
    assert cfg.context_length == 81920 and cfg.max_position_embeddings == 40960
    # round trip through the written form
    written = with_rope_scaling(legacy, cfg.rope_scaling, context_length=81920)
    assert "rope_scaling" not in written and written["max_position_embeddings"] == 81920
    assert read_rope(written) == (1e6, cfg.rope_scaling)
    assert read_rope(with_rope_scaling(written, None)) == (1e6, None)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, r"rope_parameters\.rope_type='linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type='dynamic'"),
        ({"rope_parameters": {**YARN, "attention_factor": 1.2}}, r"rope_parameters\.attention_factor"),
        ({"rope_parameters": {**YARN, "extrapolation_factor": 1.0}}, r"rope_parameters\.extrapolation_factor"),
        ({"rope_parameters": {**YARN, "mscale": 1.0}}, r"mscale and rope_parameters\.mscale_all_dim"),
        ({"rope_parameters": {**YARN, "factor": 0.5}}, r"rope_parameters\.factor must be a number >= 1"),
        ({"rope_parameters": {"rope_type": "yarn"}}, r"rope_parameters\.factor is required"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per layer type"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0}, "use_sliding_window=true"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types\[1\]='sliding_attention'"),
    ],
)
def test_configs_we_cannot_honour_are_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3Config.from_dict({**qwen3_config_dict("tiny", "float32"), **change}, "m/config.json")
    # what transformers would not window either is accepted
    inert = {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 28}
    Qwen3Config.from_dict({**qwen3_config_dict("tiny", "float32"), **inert})
    listed = {**inert, "max_window_layers": 0, "layer_types": ["full_attention"] * 2}
    Qwen3Config.from_dict({**qwen3_config_dict("tiny", "float32"), **listed})


def test_yarn_logits_tp2_packed_converted_synced_and_context_parallel_rope(tmp_path):
    """Past the original context (16 positions; rows of 48): Megatron at TP=2 gives transformers'
    logits for whole rows, for a packed row of two documents, and from a converted checkpoint; the
    sync's probe agrees with a YaRN engine and flags one without it; the export keeps YaRN; THD
    RoPE under context parallel = 2 rotates every document's positions as transformers does."""
    from transformers.models.qwen3.modeling_qwen3 import rotate_half

    hf_dir = make_tiny_model(tmp_path / "yarn", TinyModelArgs(heads=4, kv_heads=2, head_dim=16, max_positions=64,
                                                              rope_scaling=YARN, seed=5))  # fmt: skip
    plain = tmp_path / "plain"
    shutil.copytree(hf_dir, plain)
    raw = json.loads((hf_dir / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps(with_rope_scaling(raw, None)))
    ckpt = tmp_path / "ckpt"
    hf_to_megatron(str(hf_dir), str(ckpt), tp=2)
    assert load_hf_config(ckpt).rope_scaling == YarnScaling(4.0, 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 48), generator=g)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    docs = [28, 20]  # multiples of 2 x cp
    out = tmp_path / "out.pt"
    spawn(yarn_worker, 2, str(hf_dir), str(plain), str(ckpt), str(tmp_path / "ids.json"), docs, str(out))
    r = torch.load(out)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    ref = hf_logits(hf_dir, ids)
    assert rel(r["rows"], ref) < 1e-4 and torch.equal(r["rows_converted"], r["rows"])
    assert rel(hf_logits(plain, ids)[:, 16:], ref[:, 16:]) > 0.05  # plain RoPE is far off: the test can fail
    starts = [0, docs[0]]
    for start, n in zip(starts, docs):
        doc_ref = hf_logits(hf_dir, ids[:1, start : start + n])[0]
        assert rel(r["packed"][start : start + n], doc_ref) < 1e-4, f"document at {start}"
    assert r["probe_yarn"] < 1e-4 < 1e-2 < r["probe_plain"], (r["probe_yarn"], r["probe_plain"])

    cos, sin, _ = hf_rope(YARN, 16, max(docs), max_positions=64)
    positions = torch.cat([torch.arange(n) for n in docs])
    x = r["thd_input"]
    expected = x * cos[positions][:, None] + rotate_half(x) * sin[positions][:, None]
    covered = torch.zeros(len(positions), dtype=torch.bool)
    for index, rotated in r["thd_parts"]:
        torch.testing.assert_close(rotated, expected[index], rtol=1e-5, atol=1e-6)
        covered[index] = True
    assert covered.all()

    export = tmp_path / "export"
    megatron_to_hf(str(ckpt), str(export))
    assert json.loads((export / "config.json").read_text())["rope_parameters"] == raw["rope_parameters"]
    assert torch.equal(hf_logits(export, ids), ref)


def test_engines_get_the_positions_the_trainer_uses(tmp_path):
    """SGLang's flags for a YaRN config (every default spelled out), an override over a plain
    model, and the refusals; the HF engine's override equals a config written with YaRN."""
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.inference.sglang_servers import SGLangConfig, check_training_positions, server_command

    plain = make_tiny_model(tmp_path / "plain", TinyModelArgs(max_positions=16, seed=1))
    yarn = make_tiny_model(tmp_path / "yarn", TinyModelArgs(max_positions=16, rope_scaling=YARN, seed=1))

    def flags(model, **kw) -> dict:
        cmd = server_command(SGLangConfig(model_path=str(model), **kw), 0)
        pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        if "--json-model-override-args" in pairs:
            pairs["--json-model-override-args"] = json.loads(pairs["--json-model-override-args"])
        return pairs

    full = {**YARN, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "rope_theta": 1e6}
    assert flags(yarn)["--json-model-override-args"] == {"rope_parameters": full, "max_position_embeddings": 64}
    assert flags(yarn)["--context-length"] == "64"
    assert flags(plain, rope_scaling=YARN, context_length=48)["--json-model-override-args"]["rope_parameters"] == full
    assert flags(plain, rope_scaling=YARN, context_length=48)["--context-length"] == "48"
    assert "--json-model-override-args" not in flags(plain, context_length=8) and flags(plain)["--port"]
    assert "--context-length" not in flags(plain)
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.context_length=65 exceeds the 64 positions"):
        SGLangConfig(model_path=str(plain), rope_scaling=YARN, context_length=65).check_launchable()
    with pytest.raises(ConfigError, match=r"context_length=17 exceeds the 16 positions"):
        SGLangConfig(model_path=str(plain), context_length=17).check_launchable()
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.rope_scaling must be a dict with rope_type 'yarn'"):
        SGLangConfig(model_path=str(plain), rope_scaling={"rope_type": "linear", "factor": 2.0}).check_launchable()

    # RL: the engine must rotate as the trainer does (the model's own config.json)
    check_training_positions(SGLangConfig(rope_scaling=YARN), load_hf_config(yarn), 64)
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.rope_scaling gives the engine .* trainer applies"):
        check_training_positions(SGLangConfig(rope_scaling=YARN), load_hf_config(plain), 16)
    with pytest.raises(ConfigError, match=r"context_length=32 is shorter than the longest rollout sequence \(40\)"):
        check_training_positions(SGLangConfig(context_length=32), load_hf_config(yarn), 40)

    seq = list(range(3, 60))
    assert HFEngine(str(plain), rope_scaling=YARN).score([seq]) == HFEngine(str(yarn)).score([seq])
    assert HFEngine(str(plain)).score([seq]) != HFEngine(str(yarn)).score([seq])
