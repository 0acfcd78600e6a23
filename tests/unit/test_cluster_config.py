"""What a cluster run's config checks at load: the FP8 recipe and the sequence lengths FP8 GEMMs
take, the W&B keys, ``null`` for a list; and the short console line of a step."""

from __future__ import annotations

import pytest

from megatron_klear.config import load_config
from megatron_klear.errors import ConfigError
from megatron_klear.models.qwen3 import ModelOptions, fp8_sequence_multiple
from megatron_klear.sft.config import SFTConfig
from megatron_klear.training.metrics import console_line, wandb_run_id
from tests.jobs import ROOT

SFT = ROOT / "examples" / "tiny" / "sft.yaml"


def test_fp8_recipe_and_the_lengths_fp8_gemms_take():
    opts = ModelOptions()
    assert (opts.fp8_recipe, opts.fp8_amax_history_len, opts.fp8_amax_compute_algo) == ("tensorwise", 1024, "max")
    assert fp8_sequence_multiple(1, False) == 16 and fp8_sequence_multiple(4, True) == 32
    assert fp8_sequence_multiple(8, True, 2) == 128 and fp8_sequence_multiple(2, True) == 16
    for overrides, message in [
        (
            ["model.fp8=hybrid", "data.seq_len=250", "data.global_batch_tokens=2000"],
            "data.seq_len=250 must be a multiple of 16 with model.fp8",
        ),
        (["model.fp8=hybrid", "data.seq_len=250", "data.global_batch_tokens=2000"], "use 240 or 256"),
        (
            [
                "model.fp8=hybrid",
                "data.seq_len=272",
                "parallel.tp=4",
                "parallel.sequence_parallel=true",
                "data.global_batch_tokens=2176",
            ],
            "must be a multiple of 32 with model.fp8",
        ),  # fmt: skip
        (["model.fp8=hybrid", "model.fp8_recipe=bogus"], "model.fp8_recipe must be one of"),
        (["model.fp8_amax_compute_algo=mean"], "model.fp8_amax_compute_algo must be one of"),
        (
            [
                "model.fp8=hybrid",
                "model.fp8_recipe=delayed",
                "model.recompute=selective",
                "model.recompute_modules=[layernorm]",
            ],
            "'layernorm' does not work with model.fp8_recipe=delayed",
        ),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(SFTConfig, SFT, overrides)
    layernorm = ["model.recompute=selective", "model.recompute_modules=[layernorm]"]
    ok = load_config(SFTConfig, SFT, ["model.fp8=hybrid", *layernorm])
    assert ok.model.fp8_recipe == "tensorwise" and ok.data.seq_len == 256  # 256 is a multiple of 16
    load_config(SFTConfig, SFT, ["data.seq_len=250", "data.global_batch_tokens=2000"])  # bf16 takes any length


def test_wandb_keys_and_null_lists(tmp_path):
    cfg = load_config(SFTConfig, SFT, ["log.wandb_project=p", "log.wandb_entity=team", "log.wandb_tags=[a, b]"])
    w = cfg.log.wandb()
    assert (w.project, w.entity, w.group, w.tags) == ("p", "team", None, ["a", "b"])
    assert load_config(SFTConfig, SFT, []).log.wandb() is None
    with pytest.raises(ConfigError, match="log.wandb_group needs log.wandb_project"):
        load_config(SFTConfig, SFT, ["log.wandb_group=g"])
    assert load_config(SFTConfig, SFT, ["data.valid=null"]).data.valid == []  # null: no validation set
    first = wandb_run_id(tmp_path)
    assert first == wandb_run_id(tmp_path) == (tmp_path / "wandb_id").read_text().strip() and len(first) == 8


def test_step_line_is_short_and_says_how_long_is_left():
    metrics = {"loss": 1.23456, "lr": 1e-5, "grad_norm": 0.5, "tokens_per_s_per_device": 1234.5, "epoch": 0,
               "supervised_tokens": 100, "eval/avg@4": 0.5, "eval/source/x/avg@4": 0.4, "pack_fill": 0.9}  # fmt: skip
    line = console_line(10, 100, metrics, 2.0)
    shown = "loss=1.235 grad_norm=0.5 lr=1e-05 tok/s/dev=1234 eval/avg@4=0.5"
    assert line == f"[step 10/100] {shown} | 2 s/step, ETA 3.0 min"
    assert console_line(1, 5, {"loss": 2.0}, None) == "[step 1/5] loss=2"
