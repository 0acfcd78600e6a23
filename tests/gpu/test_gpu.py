"""Checks that need a GPU (``tools/gpu_check.sh`` runs them on our GPU test machine).

Every test here carries the ``gpu`` marker and is skipped without CUDA (tests/conftest.py):
the Megatron model on CUDA (torch-native spec) against HF transformers, the Triton log-prob
kernels compiled and run against the torch reference and float64, 20 SFT steps, 3 RL steps
with the HF engine on the GPU, the weight gather of a converted checkpoint, and the colocated
sync's CUDA IPC payloads read back by another process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_klear.distributed import spawn
from megatron_klear.ops.logprobs import vocab_parallel_logprobs
from tests.dist_workers import gather_worker
from tests.gpu.workers import ipc_sender_worker, model_fwd_bwd_worker
from tests.jobs import torchrun
from tests.references import reference_f64


def test_megatron_model_matches_hf_on_cuda(hf_model, tmp_path):
    """Forward and backward of the torch-native Megatron model on CUDA vs HF transformers."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 96), generator=g)
    weights = torch.randn(2, 96, 512, generator=g)
    out = tmp_path / "mg.pt"
    spawn(model_fwd_bwd_worker, 1, str(hf_model), ids, weights, str(out))
    mg = torch.load(out)
    assert mg["device"].startswith("cuda")
    hf = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).cuda()
    logits = hf(ids.cuda()).logits.float()
    (logits * weights.cuda()).sum().backward()
    ref = logits.detach().cpu()
    assert torch.allclose(mg["logits_float32"], ref, atol=2e-4, rtol=1e-4)
    layer0 = hf.model.layers[0].self_attn
    assert torch.allclose(mg["grad_final_norm"], hf.model.norm.weight.grad.cpu(), atol=1e-3, rtol=1e-3)
    assert torch.allclose(mg["grad_q_norm0"], layer0.q_norm.weight.grad.cpu(), atol=1e-3, rtol=1e-3)
    # bfloat16 parameters and activations: log-probs within bf16 rounding of float32 ones
    lp16, lp32 = mg["logits_bfloat16"].log_softmax(-1), ref.log_softmax(-1)
    assert (lp16 - lp32).abs().mean() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_triton_kernels_on_cuda(dtype, with_entropy):
    """The compiled kernels (every dtype, with and without the entropy gradient) against float64
    at a small vocabulary, and against the torch implementation at Qwen3's (152K, padded ids)."""
    g = torch.Generator().manual_seed(1)
    t, v = 64, 5000
    logits = (torch.randn(t, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (t,), generator=g)
    g_logp, g_ent = torch.randn(t, generator=g), torch.randn(t, generator=g)
    x = logits.cuda().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets.cuda(), temperature=0.7, with_entropy=with_entropy, impl="triton")
    loss = (lp * g_logp.cuda()).sum() + ((ent * g_ent.cuda()).sum() if with_entropy else 0)
    loss.backward()
    rlp, rent, rgrad = reference_f64(logits, targets, 0.7, g_logp.double(), g_ent.double() * with_entropy)
    assert torch.allclose(lp.double().cpu(), rlp, atol=1e-4, rtol=1e-5)
    if with_entropy:
        assert torch.allclose(ent.double().cpu(), rent, atol=1e-4, rtol=1e-5)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(x.grad.double().cpu(), rgrad, atol=gtol, rtol=gtol)

    t, v, real = 256, 151936, 151669  # Qwen3's padded output layer
    big = (torch.randn(t, v, generator=g) * 2).to(dtype).cuda()
    tg = torch.randint(0, real, (t,), generator=g).cuda()
    outs = {}
    for impl in ("torch", "triton"):
        y = big.clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(y, tg, with_entropy=with_entropy, impl=impl, vocab_size=real)
        (lp.sum() + (ent.sum() if with_entropy else 0)).backward()
        outs[impl] = (lp, ent, y.grad)
    (a_lp, a_ent, a_g), (b_lp, b_ent, b_g) = outs["torch"], outs["triton"]
    assert torch.allclose(a_lp, b_lp, atol=1e-4) and (not with_entropy or torch.allclose(a_ent, b_ent, atol=1e-4))
    assert torch.allclose(a_g.float(), b_g.float(), atol=gtol, rtol=gtol) and (b_g[:, real:] == 0).all()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """20 SFT steps of the tiny config on the GPU (creates the tiny model and our data)."""
    root = tmp_path_factory.mktemp("sft")
    torchrun(
        "megatron_klear.sft",
        "examples/tiny/sft.yaml",
        1,
        [f"output_dir={root / 'sft'}", f"model.hf={root / 'model'}", f"data.generate={root / 'data'}",
         "data.synthetic.n_math=1000", "data.synthetic.n_test=50",
         f"data.train=[{root / 'data' / 'sft.jsonl'}]", f"data.cache_dir={root / 'cache'}", "train_steps=20",
         "checkpoint.save_interval=10", "log.tensorboard=false", "log.peak_tflops=989"],
        timeout=240,
    )  # fmt: skip
    return root


def test_sft_20_steps(sft_run):
    rows = [json.loads(line) for line in (sft_run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert all(r["max_memory_gb"] > 0 and 0 < r["mfu"] < 1 and 0 < r["pack_fill"] <= 1 for r in rows)
    # exported by a child that saw no GPU
    assert (sft_run / "sft" / "hf" / "model.safetensors").is_file()


def test_rl_3_steps_hf_engine_on_gpu(sft_run, tmp_path):
    data = sft_run / "data"
    out = tmp_path / "rl"
    torchrun(
        "megatron_klear.rl",
        "examples/tiny/rl_math.yaml",
        1,
        [f"output_dir={out}", f"model.hf={sft_run / 'sft' / 'hf'}", "bootstrap=null", "data.generate=null",
         f"data.train=[{data / 'math_train.parquet'}]", f"data.eval=[{data / 'math_test.parquet'}]",
         "train_steps=3", "rollout.hf_device=cuda", "eval.at_start=false", "eval.at_end=false",
         "checkpoint.export_hf=false", "checkpoint.save_interval=3", "log.tensorboard=false"],
        timeout=300,
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000003"


def test_weight_gather_on_gpu(hf_model, tmp_path):
    from megatron_klear.checkpoint.convert import hf_to_megatron

    ck = tmp_path / "ck"
    hf_to_megatron(str(hf_model), str(ck))
    out = tmp_path / "buckets.pt"
    spawn(gather_worker, 1, 1, 1, str(ck), 200_000, str(out))
    got = {n: t for b in torch.load(out) for n, t in b}
    ref = load_file(hf_model / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n].cpu(), ref[n]), n


def test_colocated_cuda_ipc_payloads_rebuild_in_another_process(hf_model, tmp_path):
    """The colocated SGLang sync's payloads (local buckets on this GPU, byte-flattened,
    ForkingPickler): another process on the GPU rebuilds every HF tensor exactly from the IPC
    handles, which name the GPU by UUID, and the pickle names only what SGLang's unpickler
    allows. (SGLang itself is not on the GPU machine; its reading side is tested against the
    real server on CPU.)"""
    from megatron_klear.sync import ipc

    out = str(tmp_path / "ipc.pt")
    spawn(ipc_sender_worker, 1, str(hf_model), out)
    sender, received = torch.load(out + ".sender"), torch.load(out)
    assert sender["exitcode"] == 0 and sender["sent"].startswith("cuda")
    assert received["devices"] and all(d.startswith("cuda") for d in received["devices"])
    assert received["devices_sent"] == [sender["uuid"]]  # the GPU's UUID, as SGLang's senders write it
    assert set(sender["globals"]) <= ipc.PAYLOAD_GLOBALS, set(sender["globals"]) - ipc.PAYLOAD_GLOBALS
    ref = load_file(hf_model / "model.safetensors")
    assert sorted(received["tensors"]) == sorted(ref)
    for n, t in ref.items():
        assert torch.equal(received["tensors"][n], t), n
