"""Functions run inside spawned process groups by the tests (importable by child processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def logits_worker(tp: int, pp: int, ckpts: list[str], ids_path: str, out_dir: str) -> None:
    """For each checkpoint: load at tp x pp, forward, and save the logits from rank 0."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.forward import forward_logits, send_to_rank0
    from megatron_klear.models.qwen3 import ModelOptions, Qwen3Config, build_model

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        ids = torch.tensor(json.loads(Path(ids_path).read_text()))
        for ck in ckpts:
            cfg = Qwen3Config.from_dict(json.loads((Path(ck) / "config.json").read_text()))
            model = build_model(cfg, ModelOptions(init_weights=False))
            load_model(model, ck)
            out = send_to_rank0(forward_logits(model, ids, cfg.vocab_size))
            if torch.distributed.get_rank() == 0:
                torch.save(out, Path(out_dir) / f"{Path(ck).name}_tp{tp}_pp{pp}.pt")
    finally:
        destroy_distributed()


def logprobs_tp_worker(impl: str, path: str) -> None:
    """Each TP rank holds half the vocabulary; save log-probs, entropy and the GPPO gradient."""
    import torch.distributed as dist

    from megatron_klear.ops.logprobs import vocab_parallel_logprobs
    from megatron_klear.ops.loss import policy_loss

    dist.init_process_group("gloo")
    try:
        case = torch.load(path)
        rank, tp = dist.get_rank(), dist.get_world_size()
        shard = case["logits"].chunk(tp, dim=-1)[rank].clone().requires_grad_()
        logp, ent = vocab_parallel_logprobs(
            shard,
            case["targets"],
            tp_group=dist.group.WORLD,
            temperature=case["temperature"],
            with_entropy=True,
            impl=impl,
            vocab_size=case["vocab_size"],
        )
        loss, _ = policy_loss(logp.view(case["shape"]), case["old"], case["adv"], case["mask"])
        (loss - 0.01 * ent.mean()).backward()
        parts = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(parts, shard.grad.contiguous())
        if rank == 0:
            torch.save(dict(logp=logp, ent=ent, grad=torch.cat(parts, -1)), path + f".{impl}.out")
    finally:
        dist.destroy_process_group()


def gather_worker(tp: int, pp: int, ckpt: str, bucket_bytes: int, out: str) -> None:
    """Load a checkpoint at tp x pp, gather HF buckets, save them from rank 0."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.qwen3 import ModelOptions, Qwen3Config, build_model
    from megatron_klear.sync.gather import gather_hf_buckets

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        cfg = Qwen3Config.from_dict(json.loads((Path(ckpt) / "config.json").read_text()))
        model = build_model(cfg, ModelOptions(init_weights=False))
        load_model(model, ckpt)
        buckets = [[(n, t.clone()) for n, t in b] for b in gather_hf_buckets(model, cfg, bucket_bytes)]
        if torch.distributed.get_rank() == 0:
            torch.save(buckets, out)
        else:
            assert buckets == [], "buckets must come out on rank 0 only"
    finally:
        destroy_distributed()
