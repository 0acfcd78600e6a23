"""Foundation: Qwen3 on Megatron-Core vs HF transformers, conversion round trips, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_klear.checkpoint.hf_io import file_mode, write_generation_config
from megatron_klear.checkpoint.megatron_ckpt import checkpoint_problem, is_valid_checkpoint, read_marker
from megatron_klear.distributed import NO_GPU_ENV, ParallelConfig, spawn
from megatron_klear.errors import CheckpointError, ConfigError
from megatron_klear.models import hf_mapping
from megatron_klear.models.config import Qwen3Config, load_hf_config, padded_vocab_size
from tests.dist_workers import env_worker, logits_worker, te_extra_state_worker, tp_attributes_worker
from tests.references import hf_logits

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_logits_match_hf(tp, pp, converted, hf_models, input_ids, tmp_path):
    """Checkpoints written at TP2xPP2 load at every layout and give HF's logits."""
    ids_path, ids = input_ids
    spawn(logits_worker, tp * pp, tp, pp, [str(p) for p in converted.values()], str(ids_path), str(tmp_path))
    for name, ck in converted.items():
        ours = torch.load(tmp_path / f"{ck.name}_tp{tp}_pp{pp}.pt")
        ref = hf_logits(hf_models[name], ids)
        assert ours.shape == ref.shape
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"{name} at tp={tp} pp={pp}: relative error {rel:.2e}"
        assert ours.abs().max() > 0


def test_round_trip_is_bit_exact(converted, hf_models, tmp_path):
    for name, ck in converted.items():
        out = tmp_path / name
        megatron_to_hf(str(ck), str(out))
        a, b = load_file(hf_models[name] / "model.safetensors"), load_file(out / "model.safetensors")
        assert sorted(a) == sorted(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{name}: {k} differs"
        assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_export_loads_in_transformers_offline(converted, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    megatron_to_hf(str(converted["gqa4_tied"]), str(out), max_shard_bytes=20_000)  # force shards
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id
    assert model(input_ids[1]).logits.shape[-1] == 512


def test_tp1_written_checkpoint_loads_at_tp2_pp2(hf_models, tmp_path, input_ids):
    ids_path, ids = input_ids
    ck = tmp_path / "gqa4_untied"
    hf_to_megatron(str(hf_models["gqa4_untied"]), str(ck), tp=1, pp=1)
    spawn(logits_worker, 4, 2, 2, [str(ck)], str(ids_path), str(tmp_path))
    ours = torch.load(tmp_path / "gqa4_untied_tp2_pp2.pt")
    ref = hf_logits(hf_models["gqa4_untied"], ids)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


# --- the mapping, as pure functions -----------------------------------------------------------


@pytest.mark.parametrize("te", [False, True])
def test_mapping_shard_unshard_inverse(te):
    cfg = load_cfg(heads=8, kv=2, hd=8)
    specs = hf_mapping.param_specs(cfg, te=te)
    assert ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in specs) == te
    g = torch.Generator().manual_seed(0)
    shapes = hf_mapping.hf_tensor_shapes(cfg)
    for spec in specs.values():
        hf = {n: torch.randn(shapes[n], generator=g) for n in spec.hf}
        full = hf_mapping.to_megatron(spec, hf, cfg, padded_vocab_size(cfg.vocab_size, 2))
        shards = [hf_mapping.shard(spec, full, r, 2) for r in range(2)]
        assert torch.equal(hf_mapping.unshard(spec, shards), full)
        back = hf_mapping.to_hf(spec, full, cfg)
        assert all(torch.equal(back[n], hf[n]) for n in spec.hf)


def test_qkv_layout_is_grouped_per_kv_head():
    """Megatron's fused QKV puts each group's queries, then its key, then its value."""
    cfg = load_cfg(heads=4, kv=2, hd=1, hidden=1)
    spec = hf_mapping.param_specs(cfg)["decoder.layers.0.self_attention.linear_qkv.weight"]
    hf = {
        spec.hf[0]: torch.tensor([[0.0], [1], [2], [3]]),
        spec.hf[1]: torch.tensor([[10.0], [11]]),
        spec.hf[2]: torch.tensor([[20.0], [21]]),
    }
    full = hf_mapping.to_megatron(spec, hf, cfg, 512)
    assert full.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def load_cfg(heads=4, kv=2, hd=16, hidden=64, tied=False) -> Qwen3Config:
    return Qwen3Config.from_dict(
        dict(
            architectures=["Qwen3ForCausalLM"],
            vocab_size=500,
            hidden_size=hidden,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=hd,
            tie_word_embeddings=tied,
            dtype="float32",
        )
    )


# --- bad input ---------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(hf_models, tmp_path):
    bad = tmp_path / "llama"
    bad.mkdir()
    cfg = json.loads((hf_models["gqa1_untied"] / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        hf_to_megatron(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_parallel_sizes_checked_before_any_work(hf_models, tmp_path):
    with pytest.raises(ConfigError, match="tp=8 does not divide num_attention_heads=4"):
        hf_to_megatron(str(hf_models["gqa1_untied"]), str(tmp_path / "o1"), tp=8)
    with pytest.raises(ConfigError, match="tp=4 does not divide num_key_value_heads=2"):
        hf_to_megatron(str(hf_models["gqa4_untied"]), str(tmp_path / "o2"), tp=4)
    with pytest.raises(ConfigError, match="pp=3 does not divide num_hidden_layers=2"):
        hf_to_megatron(str(hf_models["gqa1_untied"]), str(tmp_path / "o3"), pp=3)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp x pp x cp = 2 x 2 x 1 = 4"):
        ParallelConfig(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(ConfigError, match="world size 4 is not divisible by tp x pp x cp = 1 x 1 x 3 = 3"):
        ParallelConfig(context_parallel=3).data_parallel_size(4)
    assert ParallelConfig(tp=2, context_parallel=2).data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="does not split over tp=3"):
        padded_vocab_size(500, 3)
    assert padded_vocab_size(500, 4) == 512 and padded_vocab_size(151936, 8) == 151936


def test_missing_and_partial_safetensors(hf_models, tmp_path):
    src = hf_models["gqa1_untied"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_megatron(str(partial), str(tmp_path / "o"))
    (partial / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_to_megatron(str(partial), str(tmp_path / "o"))
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="missing: model-00001-of-00002.safetensors"):
        hf_to_megatron(str(partial), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(hf_models, converted, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="pass --force"):
        hf_to_megatron(str(hf_models["gqa1_untied"]), str(out))
    with pytest.raises(CheckpointError, match="pass --force"):
        megatron_to_hf(str(converted["gqa1_untied"]), str(out))
    assert (out / "keep.txt").read_text() == "user data"
    r = subprocess.run(
        [sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(hf_models["gqa1_untied"]), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--force" in r.stderr
    hf_to_megatron(str(hf_models["gqa1_untied"]), str(out), force=True)
    assert is_valid_checkpoint(out) and not (out / "keep.txt").exists()


def test_corrupt_shard_fails_without_leaving_a_checkpoint(hf_models, tmp_path):
    src = hf_models["gqa1_untied"]
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    # Keep the header (so every name is listed) but cut the tensor data short.
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        hf_to_megatron(str(bad), str(tmp_path / "out"), tp=2)
    assert not (tmp_path / "out").exists()
    assert not any(is_valid_checkpoint(p) for p in tmp_path.iterdir())


def test_killed_conversion_leaves_nothing_that_looks_valid(hf_models, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "tools/convert_hf_to_megatron.py",
            "--hf",
            str(hf_models["gqa4_tied"]),
            "--out",
            str(out),
            "--tp",
            "2",
        ],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/model")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".killed.tmp-*")), "conversion never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not any(is_valid_checkpoint(p) for p in tmp_path.iterdir())


def test_hf_config_fields(hf_models):
    cfg = load_hf_config(hf_models["gqa4_tied"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, 8)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1_000_000.0
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_config(hf_models["gqa4_tied"] / "nothing")


def test_spawned_child_env_and_group_timeouts(tmp_path):
    """``spawn(env=NO_GPU_ENV)`` (the HF export child) hides every GPU before the child starts
    CUDA; ``parallel.timeout_minutes`` reaches the default group and Megatron's groups."""
    out = tmp_path / "seen.pt"
    spawn(env_worker, 1, 123, str(out), env=NO_GPU_ENV)
    seen = torch.load(out)
    assert seen["cuda_visible"] == "" and seen["gpus"] == 0
    assert seen["timeouts"] == {"world": 123 * 60.0, "tp": 123 * 60.0, "dp": 123 * 60.0}


def test_weights_loaded_after_the_build_are_marked_tensor_parallel(hf_models, tmp_path):
    """Built without Megatron's random init (the weights loaded next), every split weight still
    says how it is split, as after the init: the gradient norm and its clipping count all of it
    (else a run from HF weights and its resumed run clip differently at TP > 1)."""
    out = tmp_path / "attrs"
    spawn(tp_attributes_worker, 2, str(hf_models["gqa1_untied"]), str(out))
    for rank in (0, 1):
        seen = torch.load(f"{out}.{rank}")
        assert seen[False] == seen[True]
        linears = ("linear_qkv.weight", "linear_fc1.weight", "linear_proj.weight", "linear_fc2.weight")
        split = {n: a for n, a in seen[True].items() if a[0]}
        assert set(split) == {n for n in seen[True] if n.endswith(linears) or n.startswith(("embedding", "output"))}
        assert split["embedding.word_embeddings.weight"] == split["output_layer.weight"] == (True, 0, 1)
        assert split["decoder.layers.0.self_attention.linear_qkv.weight"] == (True, 0, 1)
        assert split["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)
        assert split["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)  # [gate, up] interleaved


def test_te_model_loads_a_local_spec_checkpoint(converted, tmp_path):
    """A Transformer Engine model's sharded state dict has ``_extra_state`` entries a converted
    (local-spec) checkpoint lacks: they load with the model's own value, and only they do."""
    out = tmp_path / "te.pt"
    spawn(te_extra_state_worker, 1, str(converted["gqa4_tied"]), str(out))
    r = torch.load(out)
    for key in ("decoder.final_layernorm", "decoder.layers.0.self_attention.q_layernorm"):
        assert f"{key}._extra_state" in r["extra"]
    assert r["same"], "weights loaded into the TE-like model differ from a plain load"
    assert r["error"] is not None and "lacks 1 of its tensors" in r["error"]
    assert "decoder.final_layernorm.scale" in r["error"]


def test_checkpoint_problems_name_the_file(converted, tmp_path):
    """Each way a checkpoint can be damaged after it was written is named, with its file, before
    anything loads (a resume then falls back to an older one: tests/e2e/test_sft.py)."""
    src = converted["gqa1_untied"]
    assert checkpoint_problem(src) is None
    model = "model"

    def damaged(name: str, damage) -> Path:
        ck = tmp_path / name
        shutil.copytree(src, ck)
        damage(ck / model)
        return ck

    distcp = sorted((src / model).glob("*.distcp"))[0].name
    cases = [
        ("no_marker", lambda m: (m.parent / "megatron_klear.json").unlink(), "megatron_klear.json is missing"),
        ("no_common", lambda m: (m / "common.pt").unlink(), "common.pt is missing"),
        ("no_distcp", lambda m: (m / distcp).unlink(), f"{distcp} is missing (listed in"),
        ("cut_distcp", lambda m: os.truncate(m / distcp, 100), f"{distcp} is truncated: 100 of"),
        ("cut_metadata", lambda m: os.truncate(m / ".metadata", 10), ".metadata is unreadable"),
        ("cut_common", lambda m: os.truncate(m / "common.pt", 10), "common.pt is unreadable"),
    ]
    for name, damage, message in cases:
        ck = damaged(name, damage)
        assert message in checkpoint_problem(ck), name
        with pytest.raises(CheckpointError, match=re.escape(f"{ck}: not a loadable megatron-klear checkpoint: {ck}")):
            read_marker(ck)


def test_wrong_hf_tensor_shape_names_both_tensors_and_shapes(hf_models, tmp_path):
    src = hf_models["gqa1_untied"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors")
    h, f = load_hf_config(src).hidden_size, load_hf_config(src).intermediate_size
    with pytest.raises(CheckpointError) as e:
        hf_to_megatron(str(bad), str(tmp_path / "o"))
    assert str(e.value) == (
        f"{bad}: HF tensor model.layers.1.mlp.up_proj.weight (Megatron decoder.layers.1.mlp.linear_fc1.weight) "
        f"has shape ({f}, {h - 1}), expected ({f}, {h}) from the model's config.json"
    )


def tool(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"tools/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},  # every warning that is not known shows
    )


def test_converters_never_replace_their_input_and_report_one_line(converted, hf_models, tmp_path):
    """`--out` that is or contains the input is refused even with --force; every error, also one
    raised in a conversion worker, is one line with exit 2."""
    run = tmp_path / "run"
    ck = run / "checkpoints" / "iter_0000030"
    shutil.copytree(converted["gqa1_untied"], ck)
    (run / "metrics.jsonl").write_text("{}\n")
    for args, message in [
        (("--load", str(ck), "--out", str(run), "--force"), f"--out {run} contains the input {ck}"),
        (("--load", str(ck), "--out", str(ck), "--force"), f"--out {ck} is the input {ck}"),
    ]:
        r = tool("convert_megatron_to_hf.py", *args)
        expected = f"error: {message}: replacing it would delete the input; choose another --out"
        assert r.returncode == 2 and r.stderr.strip() == expected, r.stderr
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["gqa1_untied"], hf)
    r = tool("convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path), "--force")
    assert r.returncode == 2 and f"--out {tmp_path} contains the input {hf}" in r.stderr
    assert checkpoint_problem(ck) is None and (run / "metrics.jsonl").is_file() and (hf / "config.json").is_file()
    # a config.json that does not match the weights fails inside the spawned worker
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=2 * cfg["intermediate_size"])))
    r = tool("convert_megatron_to_hf.py", "--load", str(ck), "--out", str(tmp_path / "out"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {ck}: cannot load into this model: rank 0:") and "linear_fc1" in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_serves_like_the_evaluation(converted, tmp_path):
    """Exported files are readable by others (0644 with the usual umask), and its generation config
    samples like the evaluation and stops at the end of a chat turn."""
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "hf"
    megatron_to_hf(str(converted["gqa4_tied"]), str(out), sampling={"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == file_mode(), f
    gen = GenerationConfig.from_pretrained(out)
    im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    assert gen.do_sample and (gen.temperature, gen.top_p, gen.top_k) == (0.6, 0.95, 20)
    assert gen.eos_token_id[0] == im_end
    # a base model whose config ends documents with another token keeps it, and gains <|im_end|>
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=im_end - 2)))
    (out / "generation_config.json").unlink()
    assert write_generation_config(out, temperature=1.0, top_p=1.0)["eos_token_id"] == [im_end, im_end - 2]
