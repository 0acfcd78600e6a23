"""Functions the GPU tests run in spawned processes (one GPU, NCCL world of one)."""

from __future__ import annotations

import torch


def model_fwd_bwd_worker(hf_dir: str, ids: torch.Tensor, weights: torch.Tensor, out: str) -> None:
    """The Megatron model (torch-native spec) on CUDA: float32 logits and the gradients of
    ``sum(logits * weights)`` w.r.t. two norm weights; bfloat16 logits of the same ids."""
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.forward import causal_mask
    from megatron_klear.models.qwen3 import ModelOptions, build_model, uses_transformer_engine
    from megatron_klear.models.weights import load_hf_weights

    init_distributed(ParallelConfig())
    try:
        cfg = load_hf_config(hf_dir)
        result = {}
        for dtype in ("float32", "bfloat16"):
            opts = ModelOptions(params_dtype=dtype)
            model = build_model(cfg, opts, init_weights=False)
            load_hf_weights(model, cfg, HFReader(hf_dir).get)
            dev = next(model.parameters()).device
            b, s = ids.shape
            pos = torch.arange(s, device=dev)[None].expand(b, -1)
            logits = model(ids.to(dev), pos, causal_mask(s, dev))[..., : cfg.vocab_size].float()
            result[f"logits_{dtype}"] = logits.detach().cpu()
            result["te"] = uses_transformer_engine(opts)
            result["device"] = str(dev)
            if dtype == "float32":
                (logits * weights.to(dev)).sum().backward()
                result["grad_final_norm"] = model.decoder.final_layernorm.weight.grad.cpu()
                result["grad_q_norm0"] = model.decoder.layers[0].self_attention.q_layernorm.weight.grad.cpu()
        torch.save(result, out)
    finally:
        destroy_distributed()
