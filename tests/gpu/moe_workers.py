"""Functions the Qwen3-MoE GPU tests run in spawned processes (one GPU, NCCL world of one)."""

from __future__ import annotations

import torch


def moe_cuda_worker(hf_dir: str, ids: torch.Tensor, out: str) -> None:
    """A tiny Qwen3-MoE on CUDA (torch-native spec, the all-to-all dispatcher, sequential
    experts): float32 and bfloat16 logits, the router's gradient in training mode (its
    load-balancing loss included), and the HF buckets gathered from the GPU tensors."""
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.forward import forward_logits
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.models.weights import load_hf_weights
    from megatron_klear.sync.gather import gather_hf_buckets

    init_distributed(ParallelConfig())
    try:
        cfg = load_hf_config(hf_dir)
        result = {}
        for dtype in ("float32", "bfloat16"):
            model = build_model(cfg, ModelOptions(params_dtype=dtype, use_te=False), init_weights=False)
            load_hf_weights(model, cfg, HFReader(hf_dir).get)
            result[f"logits_{dtype}"] = forward_logits(model, ids, cfg.vocab_size).cpu()
            result["device"] = str(next(model.parameters()).device)
            if dtype == "float32":
                result["tensors"] = {n: t.cpu() for b in gather_hf_buckets(model, cfg, 1 << 20) for n, t in b}
                model.train()
                dev = next(model.parameters()).device
                s = ids.shape[1]
                logits = model(ids.to(dev), torch.arange(s, device=dev)[None].expand(ids.shape[0], -1), None)
                logits.float().sum().backward()
                result["router_grad"] = model.decoder.layers[0].mlp.router.weight.grad.cpu()
        torch.save(result, out)
    finally:
        destroy_distributed()
