"""Functions the GPU tests run in spawned processes (one GPU, NCCL world of one)."""

from __future__ import annotations

import torch


def model_fwd_bwd_worker(hf_dir: str, ids: torch.Tensor, weights: torch.Tensor, out: str, use_te: bool = False) -> None:
    """The Megatron model on CUDA (the torch-native spec, or Transformer Engine's with ``use_te``):
    float32 logits and the gradients of ``sum(logits * weights)`` w.r.t. two norm weights;
    bfloat16 logits of the same ids."""
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.forward import causal_mask
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.models.weights import load_hf_weights

    init_distributed(ParallelConfig())
    try:
        cfg = load_hf_config(hf_dir)
        result = {}
        for dtype in ("float32", "bfloat16"):
            opts = ModelOptions(params_dtype=dtype, use_te=use_te)  # explicit: TE installed or not
            model = build_model(cfg, opts, init_weights=False)
            load_hf_weights(model, cfg, HFReader(hf_dir).get)
            dev = next(model.parameters()).device
            b, s = ids.shape
            pos = torch.arange(s, device=dev)[None].expand(b, -1)
            logits = model(ids.to(dev), pos, causal_mask(s, dev))[..., : cfg.vocab_size].float()
            result[f"logits_{dtype}"] = logits.detach().cpu()
            result["device"] = str(dev)
            if dtype == "float32":
                (logits * weights.to(dev)).sum().backward()
                result["grad_final_norm"] = model.decoder.final_layernorm.weight.grad.cpu()
                result["grad_q_norm0"] = model.decoder.layers[0].self_attention.q_layernorm.weight.grad.cpu()
        torch.save(result, out)
    finally:
        destroy_distributed()


def ipc_receiver(payloads: list[str], out: str) -> None:
    """What an SGLang TP rank on the same GPU does with a colocated payload: unpickle it (the
    flat CUDA tensor comes back from its IPC handle, its GPU named by UUID) and slice the tensors
    out of it (``FlattenedTensorBucket.reconstruct_tensors``). Saves the tensors on the CPU."""
    from megatron_klear.sync import ipc

    got, devices, sent = {}, set(), []
    for payload in payloads:
        obj = ipc.load_payload(payload, sent)
        flat = obj["flattened_tensor"]
        devices.add(str(flat.device))
        for m in obj["metadata"]:
            got[m.name] = flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape).cpu()
    torch.save(dict(tensors=got, devices=sorted(devices), devices_sent=sorted(set(map(str, sent)))), out)


def ipc_sender_worker(hf_dir: str, out: str) -> None:
    """The colocated sync's payloads from a model on this GPU (``sync.colocated``: local buckets,
    SGLang's byte-flattened layout, ForkingPickler), read by another process while they live."""
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.inference import sglang_api as api
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.models.weights import load_hf_weights
    from megatron_klear.sync import ipc
    from megatron_klear.sync.gather import local_hf_buckets

    init_distributed(ParallelConfig())
    try:
        cfg = load_hf_config(hf_dir)
        model = build_model(cfg, ModelOptions(), init_weights=False)
        load_hf_weights(model, cfg, HFReader(hf_dir).get)
        flats, payloads, names = [], [], set()
        for bucket in local_hf_buckets(model, cfg, 200_000):
            flat, meta = api.flatten_bucket(api.bucket_order(bucket))
            flats.append(flat)  # alive until the receiver has read every payload
            payloads.append(ipc.serialize_payload(flat, meta))
            names |= ipc.payload_globals(payloads[-1])
        receiver = torch.multiprocessing.get_context("spawn").Process(target=ipc_receiver, args=(payloads, out))
        receiver.start()
        receiver.join(120)
        uuid = str(torch.cuda.get_device_properties(flats[0].device).uuid)
        sender = dict(exitcode=receiver.exitcode, globals=sorted(names), sent=str(flats[0].device), uuid=uuid)
        torch.save(sender, out + ".sender")
    finally:
        destroy_distributed()
