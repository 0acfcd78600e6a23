"""Qwen3-MoE training on CPU with gloo at EP=2 (torchrun, 2 ranks, the all-to-all dispatcher):
SFT learns, logs the router's load-balancing loss and resumes exactly after a crash; GPPO RL
from that SFT model syncs into the HF engine every step (probe under 1e-4), its old-log-prob
pass and its update route alike (ratio exactly 1 on a single update), and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_rl import CONFIG as RL_CONFIG
from tests.e2e.test_rl import metrics, rl_overrides
from tests.jobs import torchrun

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "sft.jsonl"
EP2 = ["parallel.expert_parallel=2"]
SFT_STEPS = 24


def sft_overrides(model: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"model.hf={model}",
        "model.create_tiny=null",
        f"data.train=[{DATA}]",
        f"data.cache_dir={cache}",
        "data.generate=null",
        f"train_steps={SFT_STEPS}",
        "checkpoint.save_interval=8",
        "checkpoint.keep_last=5",
        "log.tensorboard=false",
        *EP2,
    ]


def rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def moe_sft(tmp_path_factory) -> Path:
    """A 4-layer tiny Qwen3-MoE (4 experts, top-2, layer 2 dense) after SFT at EP=2; its run dir."""
    from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

    root = tmp_path_factory.mktemp("moe_train")
    args = TinyModelArgs(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, moe=True, experts=4)
    base = make_tiny_model(root / "base", TinyModelArgs(**{**args.__dict__, "moe_ffn": 64, "mlp_only_layers": [2]}))
    torchrun("megatron_klear.sft", "examples/tiny/sft.yaml", 2, sft_overrides(base, root / "sft", root / "cache"))
    return root / "sft"


def test_moe_sft_at_ep2_learns_logs_the_aux_loss_and_resumes_exactly(moe_sft, tmp_path):
    ref = rows(moe_sft)
    assert sorted(ref) == list(range(1, SFT_STEPS + 1))
    first = sum(ref[s]["loss"] for s in range(1, 5)) / 4
    last = sum(ref[s]["loss"] for s in range(SFT_STEPS - 3, SFT_STEPS + 1)) / 4
    assert last < 0.8 * first, (first, last)
    aux = [ref[s]["moe/load_balancing_loss"] for s in ref]
    assert all(0.5 < a < 4.0 for a in aux), aux  # 1.0: balanced; top-2 of 4 experts: at most 4 / 2 = 2
    cfg = json.loads((moe_sft / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and (moe_sft / "hf" / "model.safetensors").is_file()

    base = Path(json.loads((moe_sft / "config.json").read_text())["model"]["hf"])
    crashed = tmp_path / "crashed"
    o = sft_overrides(base, crashed, tmp_path / "cache") + ["checkpoint.export_hf=false"]
    r = torchrun("megatron_klear.sft", "examples/tiny/sft.yaml", 2, o, crash_at="step:12", expect_ok=False)
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000008"
    r = torchrun("megatron_klear.sft", "examples/tiny/sft.yaml", 2, o)
    assert "resumed from" in r.stdout
    got = rows(crashed)
    keys = ("loss", "moe/load_balancing_loss", "grad_norm")
    for s in range(9, SFT_STEPS + 1):  # bit-exact on CPU: weights, optimizer, data position, routing
        assert [got[s][k] for k in keys] == [ref[s][k] for k in keys], s


def test_moe_rl_at_ep2_syncs_routes_alike_and_resumes_exactly(moe_sft, tmp_path):
    model = moe_sft / "hf"
    # one mini-batch per step: the update's first forward sees the weights the old log-probs saw
    common = ["data.mini_batch_prompts=4", "checkpoint.save_interval=2", "data.max_gen_batches=2", *EP2]
    ref = tmp_path / "ref"
    torchrun("megatron_klear.rl", RL_CONFIG, 2, rl_overrides(model, ref, steps=3) + common)
    m = metrics(ref)
    assert sorted(m) == [1, 2, 3]
    trained = [s for s in m if m[s]["train/updates"] > 0]
    assert trained, "no step had a group with reward signal"
    for s in sorted(m):
        assert m[s]["rollout/logprob_diff"] < 1e-4, s  # the probe after each step's sync
    for s in trained:
        assert m[s]["train/updates"] == 1 and m[s]["rollout/train_engine_diff"] < 1e-4
        assert m[s]["loss/ppo_kl"] == 0.0 and m[s]["loss/clipfrac_high"] == m[s]["loss/clipfrac_low"] == 0.0
        assert 0.5 < m[s]["moe/load_balancing_loss"] < 4.0
    crashed = tmp_path / "crashed"
    o = rl_overrides(model, crashed, steps=3) + common
    r = torchrun("megatron_klear.rl", RL_CONFIG, 2, o, crash_at="rollout:3", expect_ok=False)
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000002"
    r = torchrun("megatron_klear.rl", RL_CONFIG, 2, o)
    assert "resumed from" in r.stdout
    b = metrics(crashed)
    for k in ("reward/mean", "loss/pg", "loss/grad_norm", "response/length_mean", "rollout/logprob_diff"):
        assert b[3].get(k) == m[3].get(k), k
    assert b[3].get("moe/load_balancing_loss") == m[3].get("moe/load_balancing_loss")
