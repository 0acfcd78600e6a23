"""Qwen3-MoE: config and layout refusals, the expert mapping, conversion round trips (fp32, bf16),
and logits and weight gathering at every expert-parallel layout against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_klear.distributed import ParallelConfig, spawn
from megatron_klear.errors import ConfigError
from megatron_klear.models import hf_mapping
from megatron_klear.models.config import Qwen3Config, load_hf_config, validate_parallel, validate_training_layout
from megatron_klear.models.qwen3 import ModelOptions, moe_options
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from tests.dist_workers import moe_layouts_worker, sync_worker

ROOT = Path(__file__).resolve().parents[2]
# (tp, pp, ep, etp) on 4 ranks: EP=2 (expert-DP 2), EP=4, TP=2 x EP=2 (experts whole), TP=2 x EP=2
# with expert TP 2, PP=2 x EP=2, TP=2 x PP=2 x EP=2.
LAYOUTS = [(1, 1, 2, 1), (1, 1, 4, 1), (2, 1, 2, 1), (2, 1, 2, 2), (1, 2, 2, 1), (2, 2, 2, 1)]


def moe_dict(**overrides) -> dict:
    cfg = dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def test_moe_config_fields_and_sparse_layers():
    cfg = Qwen3Config.from_dict(moe_dict(mlp_only_layers=[2], router_aux_loss_coef=0.01))
    assert cfg.moe.num_experts == 8 and cfg.moe.router_aux_loss_coef == 0.01
    assert [cfg.is_sparse(i) for i in range(4)] == [True, True, False, True]
    step2 = Qwen3Config.from_dict(moe_dict(decoder_sparse_step=2))
    assert [step2.is_sparse(i) for i in range(4)] == [False, True, False, True]
    # transformers 5 writes num_local_experts for num_experts
    alias = moe_dict(num_local_experts=4)
    del alias["num_experts"]
    assert Qwen3Config.from_dict(alias).moe.num_experts == 4
    assert Qwen3Config.from_dict(dict(moe_dict(), architectures=["Qwen3ForCausalLM"], model_type="qwen3")).moe is None


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size"),
        (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), "use_sliding_window"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts_per_tok=1), "num_experts_per_tok"),  # with norm_topk_prob
        (dict(num_experts=0), "num_experts"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(mlp_only_layers=[4]), "mlp_only_layers"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(router_aux_loss_coef=-1), "router_aux_loss_coef"),
    ],
)
def test_unsupported_moe_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        Qwen3Config.from_dict(moe_dict(**overrides), source="m/config.json")


def test_moe_layouts_and_options_refused_naming_the_key():
    cfg = Qwen3Config.from_dict(moe_dict(num_experts=6))
    dense = Qwen3Config.from_dict(dict(moe_dict(), architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    with pytest.raises(ConfigError, match="parallel.expert_parallel=4 does not divide num_experts=6"):
        validate_parallel(cfg, 1, 1, ep=4)
    with pytest.raises(ConfigError, match="parallel.expert_tensor_parallel=3 does not divide moe_intermediate_size"):
        validate_parallel(cfg, 1, 1, etp=3)
    with pytest.raises(ConfigError, match="parallel.expert_parallel=2 .* need a Qwen3-MoE model"):
        validate_parallel(dense, 1, 1, ep=2)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true"):
        validate_training_layout(cfg, ParallelConfig(tp=2, expert_parallel=2))
    validate_training_layout(cfg, ParallelConfig(tp=2, sequence_parallel=True, expert_parallel=2))
    with pytest.raises(ConfigError, match="parallel.expert_tensor_parallel x parallel.expert_parallel x parallel.pp"):
        ParallelConfig(tp=2, expert_parallel=3).data_parallel_size(4)
    assert ParallelConfig(tp=2, expert_parallel=2).data_parallel_size(2) == 1  # EP inside the TP ranks
    with pytest.raises(ConfigError, match="parallel.expert_parallel must be >= 1"):
        ParallelConfig(expert_parallel=0).validate()
    with pytest.raises(ConfigError, match="model.moe_token_dispatcher"):
        ModelOptions(moe_token_dispatcher="flex").validate()
    with pytest.raises(ConfigError, match="model.moe_aux_loss_coef"):
        ModelOptions(moe_aux_loss_coef=-0.1).validate()
    with pytest.raises(ConfigError, match="model.moe_grouped_gemm=true needs Transformer Engine"):
        moe_options(cfg, ModelOptions(use_te=False, moe_grouped_gemm=True), 1, 1)
    opts = moe_options(cfg, ModelOptions(use_te=False, moe_aux_loss_coef=0.0), 2, 1)
    assert opts["moe_aux_loss_coeff"] == 0.0 and opts["moe_router_topk"] == 2 and not opts["moe_grouped_gemm"]
    assert moe_options(cfg, ModelOptions(use_te=False), 1, 1)["moe_aux_loss_coeff"] == cfg.moe.router_aux_loss_coef


# --- the mapping, as pure functions -----------------------------------------------------------


def test_expert_names_are_global_for_sequential_and_grouped_experts():
    seq = "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"
    grouped = "decoder.layers.1.mlp.experts.linear_fc2.weight3"
    assert hf_mapping.global_name(seq, 2, 4) == "decoder.layers.3.mlp.experts.6.linear_fc1.weight"
    assert hf_mapping.global_name(grouped, 0, 4) == "decoder.layers.1.mlp.experts.7.linear_fc2.weight"
    cfg = Qwen3Config.from_dict(moe_dict(mlp_only_layers=[2]))
    specs = hf_mapping.param_specs(cfg, te=True)
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in specs  # TE's dense layer: fused norm
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in specs  # a MoE layer's norm stands alone
    spec = specs["decoder.layers.3.mlp.experts.7.linear_fc1.weight"]
    assert spec.expert and spec.hf[0] == "model.layers.3.mlp.experts.7.gate_proj.weight"
    shapes = hf_mapping.hf_tensor_shapes(cfg)
    assert shapes["model.layers.0.mlp.gate.weight"] == (8, 32)
    assert shapes["model.layers.0.mlp.experts.5.down_proj.weight"] == (32, 16)
    assert shapes["model.layers.2.mlp.down_proj.weight"] == (32, 64)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(shapes[n], generator=g) for n in spec.hf}
    full = hf_mapping.to_megatron(spec, hf, cfg, 512)
    shards = [hf_mapping.shard(spec, full, r, 2) for r in range(2)]  # expert TP 2: [gate_r; up_r]
    assert torch.equal(shards[0][:8], hf[spec.hf[0]][:8]) and torch.equal(shards[0][8:], hf[spec.hf[1]][:8])
    assert torch.equal(hf_mapping.unshard(spec, shards), full)
    assert hf_mapping.active_params(cfg) < hf_mapping.num_params(cfg)


def test_hub_views_cover_transformers_fused_experts(moe_models):
    """The HF engine writes hub-named tensors into transformers' fused experts through these
    views: loaded from disk, each view equals the checkpoint's tensor of that name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_models["moe"], dtype=torch.float32)
    views = hf_mapping.hub_views(model.named_parameters())
    disk = load_file(moe_models["moe"] / "model.safetensors")
    assert sorted(views) == sorted(disk)
    assert all(torch.equal(views[n], disk[n]) for n in disk)
    with torch.no_grad():
        views["model.layers.0.mlp.experts.3.up_proj.weight"].fill_(7.0)
    fused = dict(model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    width = fused.shape[1] // 2  # [gate; up]
    assert (fused[3, width:] == 7.0).all() and not (fused[3, :width] == 7.0).any()


# --- conversion and parity --------------------------------------------------------------------


def _hf_reference(model_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    return out.logits.float(), [r for r in out.router_logits if r is not None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_router_scores_are_well_separated_and_an_expert_swap_shows(moe_models, input_ids):
    """The premise of the parity tests: on the test tokens the k-th and (k+1)-th router logits
    differ by far more than the two implementations' rounding (a tie cannot decide the top-k),
    every expert is chosen (the dispatch reaches every expert-parallel rank), and swapping two
    experts moves the logits by far more than the 1e-4 tolerance."""
    _, ids = input_ids
    for name, d in moe_models.items():
        cfg = load_hf_config(d)
        ref, routers = _hf_reference(d, ids)
        k = cfg.moe.num_experts_per_tok
        for r in routers:
            top = r.sort(dim=-1, descending=True).values
            assert (top[:, k - 1] - top[:, k]).min() > 1e-3, f"{name}: a near-tie in the router's top-{k}"
            chosen = r.topk(k, dim=-1).indices.unique()
            assert len(chosen) == cfg.moe.num_experts, f"{name}: experts never routed to"
        swapped = Path(str(d) + "_swapped")
        if not swapped.exists():
            make_tiny_model(swapped, TinyModelArgs(**{**_args_of(name).__dict__, "with_tokenizer": False}))
            t = load_file(swapped / "model.safetensors")
            layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_sparse(i))
            for p in ("gate_proj", "up_proj", "down_proj"):
                a, b = (f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for e in (0, 1))
                t[a], t[b] = t[b], t[a]
            from safetensors.torch import save_file

            save_file(t, swapped / "model.safetensors", metadata={"format": "pt"})
        assert _rel(_hf_reference(swapped, ids)[0], ref) > 1e-2


def _args_of(name: str) -> TinyModelArgs:
    from tests.conftest import MOE_MODELS

    return MOE_MODELS[name]


def test_moe_logits_and_gather_at_every_layout(moe_models, moe_converted, input_ids, tmp_path):
    """Converted at EP=2 (2 processes), loaded at each layout of LAYOUTS (4 processes, one
    start-up): logits match transformers' Qwen3MoeForCausalLM, and the gathered HF buckets equal
    the checkpoint bit for bit, each under the bucket limit, every tensor once. The float32
    round trip (exported from the EP=2 checkpoint) is bit-exact."""
    ids_path, ids = input_ids
    ckpts = [moe_converted[name] for name in moe_models]
    bucket_bytes = 6_000  # well under one layer's experts: they must stream
    spawn(moe_layouts_worker, 4, LAYOUTS, [str(c) for c in ckpts], str(ids_path), bucket_bytes, str(tmp_path))
    for name, d in moe_models.items():
        ref, _ = _hf_reference(d, ids)
        disk = load_file(d / "model.safetensors")
        for tp, pp, ep, etp in LAYOUTS:
            got = torch.load(tmp_path / f"{name}_{tp}{pp}{ep}{etp}.pt")
            where = f"{name} at tp={tp} pp={pp} ep={ep} etp={etp}"
            assert _rel(got["logits"], ref) < 1e-4, f"{where}: relative error {_rel(got['logits'], ref):.2e}"
            tensors = {}
            for bucket in got["buckets"]:
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                assert size <= bucket_bytes or len(bucket) == 1, f"{where}: a bucket of {size} bytes"
                for n, t in bucket:
                    assert n not in tensors, f"{where}: {n} sent twice"
                    tensors[n] = t
            assert sorted(tensors) == sorted(disk), where
            assert all(torch.equal(tensors[n], disk[n]) for n in disk), where
    megatron_to_hf(str(ckpts[0]), str(tmp_path / "back"))
    _assert_bit_exact(moe_models["moe"], tmp_path / "back", torch.float32)


def _assert_bit_exact(src: Path, back: Path, dtype: torch.dtype) -> None:
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
def test_bf16_round_trip_is_bit_exact(moe, tmp_path):
    """bf16 in, bf16 out, every bit. Megatron's torch-native RMSNorm keeps float32 weights in a
    bf16 model (the dense model's 17 norms here): the export writes them in the checkpoint's
    dtype again. The MoE model goes through EP=2, the dense one through TP=2."""
    args = _args_of("moe") if moe else TinyModelArgs(layers=4, seed=7)
    src = make_tiny_model(tmp_path / "hf", TinyModelArgs(**{**args.__dict__, "dtype": "bfloat16"}))
    hf_to_megatron(str(src), str(tmp_path / "mg"), tp=1 if moe else 2, ep=2 if moe else 1)
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"))
    if not moe:
        assert len([k for k in load_file(src / "model.safetensors") if k.endswith("norm.weight")]) == 17
    _assert_bit_exact(src, tmp_path / "back", torch.bfloat16)


def test_sync_into_hf_engine_after_training_at_ep2(moe_models, tmp_path):
    """4 ranks, EP=2: rank 1 (data-parallel 1) holds the second half of the experts and takes part
    in the gather, ranks 2 and 3 (expert-data-parallel replica 1) do not. After optimizer steps
    every engine tensor (transformers' fused experts, through their hub names) equals the
    trainer's, the probe agrees, and a sync into a model with other experts fails on every rank."""
    out = str(tmp_path / "sync")
    spawn(sync_worker, 4, 1, 1, str(moe_models["moe"]), str(moe_models["moe_nonorm_tied"]), out, 2)
    results = [torch.load(f"{out}.{r}") for r in range(4)]
    r0 = results[0]
    assert sorted(r0["engine"]) == sorted(r0["ref"]) == sorted(load_file(moe_models["moe"] / "model.safetensors"))
    changed = 0
    for n, t in r0["engine"].items():
        assert torch.equal(t, r0["ref"][n]), n
        changed += not torch.equal(t, r0["before"][n])
    experts = [n for n in r0["engine"] if ".mlp.experts." in n]
    assert changed >= len(r0["engine"]) - 2 and all(not torch.equal(r0["engine"][n], r0["before"][n]) for n in experts)
    assert r0["version"] == "step-3" and r0["buckets"] > 1
    for r in results:
        assert r["diff"] == r0["diff"] and r["diff"] < 1e-4
        assert r["failure"] is not None and "has no parameter named" in r["failure"]
    assert r0["wrong_stale"]


def test_qwen3_30b_a3b_examples_fit_their_node_counts():
    """The examples' layouts against the Slurm launcher's checks (world size, expert layout,
    batch layout, engine nodes) and the real model's shape (shapes.py's 30b-a3b)."""
    from megatron_klear.errors import LaunchError
    from megatron_klear.launch.slurm import SlurmJob, plan_launch
    from megatron_klear.models.shapes import qwen3_config_dict

    def job(n: int) -> SlurmJob:
        return SlurmJob(job_id="7", hosts=[f"n{i}" for i in range(n)], procs_per_node=8)

    d = "examples/qwen3_30b_a3b/"
    assert len(plan_launch("sft", d + "sft_32k.yaml", [], job(4), this_host="n0").trainer_hosts) == 4
    assert len(plan_launch("sft", d + "sft_32k.yaml", ["parallel.pp=2"], job(2), this_host="n0").trainer_hosts) == 2
    with pytest.raises(LaunchError, match="parallel.expert_tensor_parallel x parallel.expert_parallel x parallel.pp"):
        plan_launch("sft", d + "sft_32k.yaml", ["parallel.expert_parallel=16"], job(1))
    plan = plan_launch("rl", d + "rl_math.yaml", [], job(4), this_host="n0")
    assert plan.trainer_hosts == ["n0", "n1"] and plan.engines.hosts == ["n2", "n3"]
    assert plan_launch("rl", d + "rl_math_2node.yaml", [], job(2), this_host="n0").engines is None
    cfg = Qwen3Config.from_dict(qwen3_config_dict("30b-a3b"))
    assert round(hf_mapping.num_params(cfg) / 1e9, 1) == 30.5 and 3.3 < hf_mapping.active_params(cfg) / 1e9 < 3.4
    for name, over in (("sft_32k.yaml", {}), ("rl_math.yaml", {}), ("rl_math_2node.yaml", {})):
        raw = __import__("yaml").safe_load(open(d + name))
        par = ParallelConfig(**{**raw["parallel"], **over})
        validate_training_layout(cfg, par)


def test_moe_runs_refuse_unsupported_layouts_naming_the_key(moe_models, tmp_path):
    """Through the real entry points (``--dry-run``: nothing starts): TP without sequence parallel,
    RL's load-balancing loss with a per-sequence normaliser; one line, exit 2."""
    import os
    import subprocess
    import sys

    def cli(module: str, *args: str) -> subprocess.CompletedProcess:  # as torchrun's rank 0 of 2 would
        env = dict(os.environ, PYTHONWARNINGS="ignore", RANK="0", WORLD_SIZE="2")
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, env=env)

    SFT, RL = ROOT / "examples/tiny/sft.yaml", ROOT / "examples/tiny/rl_math.yaml"
    moe = moe_models["moe"]
    sft = ["--dry-run", f"data.train=[{ROOT / 'examples/data/sft.jsonl'}]", "data.generate=null"]
    sft += [f"output_dir={tmp_path / 'o'}", f"model.hf={moe}", "model.create_tiny=null"]
    rl = ["--dry-run", f"output_dir={tmp_path / 'r'}", f"model.hf={moe}", "bootstrap=null", "data.generate=null"]
    rl += [f"data.train=[{ROOT / 'examples/data/math_train.parquet'}]"]
    rl += [f"data.eval=[{ROOT / 'examples/data/math_test.parquet'}]"]
    for module, cfg, args, message in [
        ("megatron_klear.sft", SFT, sft + ["parallel.tp=2"], "parallel.sequence_parallel=true"),
        ("megatron_klear.rl", RL, rl + ["algo.agg=seq-mean-token-mean"], "model.moe_aux_loss_coef=0"),
    ]:
        r = cli(module, "--config", str(cfg), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = cli("megatron_klear.rl", "--config", str(RL), *rl, "algo.agg=seq-mean-token-mean", "model.moe_aux_loss_coef=0")
    assert r.returncode == 0, r.stderr[-2000:]
