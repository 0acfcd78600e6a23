"""Functions run inside spawned process groups by the tests (importable by child processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def logits_worker(tp: int, pp: int, ckpts: list[str], ids_path: str, out_dir: str) -> None:
    """For each checkpoint: load at tp x pp, forward, and save the logits from rank 0."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.forward import forward_logits, send_to_rank0
    from megatron_klear.models.qwen3 import ModelOptions, build_model

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        ids = torch.tensor(json.loads(Path(ids_path).read_text()))
        for ck in ckpts:
            cfg = Qwen3Config.from_dict(json.loads((Path(ck) / "config.json").read_text()))
            model = build_model(cfg, ModelOptions(), init_weights=False)
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
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.sync.gather import gather_hf_buckets

    init_distributed(ParallelConfig(tp=tp, pp=pp))
    try:
        cfg = Qwen3Config.from_dict(json.loads((Path(ckpt) / "config.json").read_text()))
        model = build_model(cfg, ModelOptions(), init_weights=False)
        load_model(model, ckpt)
        buckets = [[(n, t.clone()) for n, t in b] for b in gather_hf_buckets(model, cfg, bucket_bytes)]
        if torch.distributed.get_rank() == 0:
            torch.save(buckets, out)
        else:
            assert buckets == [], "buckets must come out on rank 0 only"
    finally:
        destroy_distributed()


def hf_train_state(hf_dir: str, optim=None):
    """``(config, train state)`` of the HF model in ``hf_dir``, with its weights, an optimizer
    (default: constant lr 1e-2) and a 10-step schedule: the start of the training workers here.
    Call after ``init_distributed``."""
    from megatron_klear.checkpoint.hf_io import HFReader
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.qwen3 import ModelOptions
    from megatron_klear.models.weights import load_hf_weights
    from megatron_klear.training.state import OptimConfig, build_train_state

    cfg = load_hf_config(hf_dir)
    optim = optim or OptimConfig(lr=1e-2, min_lr=1e-2, decay_style="constant")

    def init_weights(model) -> None:
        load_hf_weights(model, cfg, HFReader(hf_dir).get)

    return cfg, build_train_state(cfg, ModelOptions(), optim, 10, init_weights=init_weights)


def sync_worker(tp: int, pp: int, hf_dir: str, wrong_hf_dir: str, out: str, ep: int = 1) -> None:
    """Train a few steps at tp x pp (x ep), sync into an HF engine on rank 0, check it, save results."""
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.errors import SyncError
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.ops.loss import nll_loss
    from megatron_klear.sync.gather import gather_hf_buckets
    from megatron_klear.sync.weights import probe_logprob_diff, sync_weights
    from megatron_klear.training.batches import MicroBatch
    from megatron_klear.training.step import forward_backward, optimizer_step

    init_distributed(ParallelConfig(tp=tp, pp=pp, expert_parallel=ep), seed=7)
    try:
        cfg, eng = hf_train_state(hf_dir)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        labels = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=ids.dtype)], 1)  # the last predicts nothing
        mask = torch.ones(2, 16)
        mask[:, -1] = 0
        # plain rows: forward_backward builds the causal mask
        mb = MicroBatch(ids, torch.arange(16)[None].expand(2, -1), labels, mask)
        for _ in range(3):
            forward_backward(eng, [mb], nll_loss(cfg.vocab_size, "torch"))
            optimizer_step(eng)
        eng.sync_params()  # with DP > 1 a step updates only each rank's shard until this (or a forward)
        rank0 = torch.distributed.get_rank() == 0
        engine = HFEngine(hf_dir) if rank0 else None
        before = {n: p.detach().clone() for n, p in engine.params.items()} if rank0 else None
        stats = sync_weights(engine, eng.module, cfg, "step-3", bucket_bytes=30_000)
        ref = {n: t.clone() for b in gather_hf_buckets(eng.module, cfg) for n, t in b}
        probe = ids[0, :13].tolist()  # + 4 sampled tokens: 17, not a multiple of TP=2
        seen = []
        hook = eng.module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
        diff = probe_logprob_diff(engine, eng.module, cfg, probe, new_tokens=4, max_diff=1e-3)
        hook.remove()
        noisy = NoisyOnce(engine) if rank0 else None  # its first probe is off by 0.5 per token
        reprobed = probe_logprob_diff(noisy, eng.module, cfg, probe, new_tokens=4, max_diff=1e-3)
        kept = engine.params["lm_head.weight"].detach().clone() if rank0 else None
        if rank0:  # the engine did not get the trainer's weights: every probe is off
            engine.params["lm_head.weight"].data.mul_(3.0)
        try:
            probe_logprob_diff(engine, eng.module, cfg, probe, new_tokens=4, max_diff=1e-3)
            off = None
        except SyncError as e:
            off = str(e)
        if rank0:
            engine.params["lm_head.weight"].data.copy_(kept)
        wrong = HFEngine(wrong_hf_dir) if rank0 else None
        try:
            sync_weights(wrong, eng.module, cfg, "step-3")
            failure = None
        except SyncError as e:
            failure = str(e)
        result = dict(diff=diff, failure=failure, buckets=stats.buckets, bytes=stats.bytes, probe_lengths=seen,
                      reprobed=reprobed, noisy_calls=noisy.calls if rank0 else None, off=off,
                      memory_order=released_sync_order(hf_dir, eng.module, cfg))  # fmt: skip
        if rank0:
            result.update(
                engine={n: p.detach().clone() for n, p in engine.params.items()},
                before=before,
                ref=ref,
                version=engine.version,
                wrong_stale=wrong.stale,
            )
        torch.save(result, f"{out}.{torch.distributed.get_rank()}")
    finally:
        destroy_distributed()


def released_sync_order(hf_dir: str, module, cfg) -> list:
    """Collective: the RL loop's sync (``sync_into_engine``) into an engine whose memory was
    released (rollout.release_memory), logging on every rank when the trainer's cache is freed
    (``free_trainer_cache``, the real function, wrapped) and, on rank 0, the engine's memory
    calls and buckets (the HF engine, logging them). On CPU there is no CUDA cache to measure:
    the order of the calls is what can be seen of it here."""
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.sync import weights

    log: list = []

    class MemoryLog(HFEngine):
        def resume_memory(self, tags=("weights", "kv_cache")):
            log.append(("resume", *tags))
            super().resume_memory(tags)

        def update_bucket(self, bucket):
            log.append("bucket")
            super().update_bucket(bucket)

    real = weights.free_trainer_cache
    weights.free_trainer_cache = lambda: (log.append("free"), real())[1]
    try:
        engine = MemoryLog(hf_dir) if torch.distributed.get_rank() == 0 else None
        if engine is not None:
            engine.release_memory(("weights", "kv_cache", "cuda_graph"))
        weights.sync_into_engine(engine, module, cfg, "released", bucket_bytes=30_000, released=True)
    finally:
        weights.free_trainer_cache = real
    return log


class NoisyOnce:
    """An engine whose first generation reports log-probs 0.5 off per token, then the engine's
    own: one noisy probe. A real engine's numerical noise cannot be produced on demand, so this
    wrapper stands in for that one draw; everything else is the wrapped HF engine's."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def generate(self, prompts, params, budgets=None):
        out = self.engine.generate(prompts, params, budgets)
        self.calls += 1
        if self.calls == 1:
            for group in out:
                for c in group:
                    c.logprobs = [lp - 0.5 for lp in c.logprobs]
        return out


def rl_groups(vocab: int, seed: int = 0) -> list:
    """Three groups of four samples with long-tailed lengths, for the RL layout tests."""
    from megatron_klear.rl.rollout import Sample, group_advantages

    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(3):
        samples = []
        for j in range(4):
            p = int(torch.randint(3, 12, (), generator=g))
            r = [1, 3, 9, 44, 5, 17, 2, 30, 12, 6, 25, 4][4 * k + j]
            ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
            eng = (-torch.rand(r, generator=g) * 3).tolist()
            correct = (k + j) % 3 == 0
            samples.append(Sample(f"u{k}", ids[:p], ids[p:], eng, "stop", float(correct), correct, ""))
        for s, a in zip(samples, group_advantages([s.reward for s in samples])):
            s.advantage = a
        groups.append(samples)
    return groups


def dp_full_grads(train_state) -> dict[str, torch.Tensor]:
    """This rank's parameter gradients after ``forward_backward``, complete: the distributed
    optimizer leaves each DP rank with its reduce-scattered shard of the grad buffer only, so
    the shards are all-gathered back into the buffer first."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    group = ps.get_data_parallel_group(with_context_parallel=True)
    dp, rank = dist.get_world_size(group), dist.get_rank(group)
    for bucket_group in train_state.model.bucket_groups:
        for bucket in bucket_group.buckets:
            shards = shard_buffer(bucket.grad_data, dp)
            gathered = [torch.empty_like(s) for s in shards]
            dist.all_gather(gathered, shards[rank].contiguous(), group=group)
            bucket.grad_data.copy_(torch.cat(gathered))
    return {n: p.main_grad.detach().clone() for n, p in train_state.module.named_parameters()}


def rl_layout_worker(tp: int, pp: int, hf_dir: str, cases: dict, out: str) -> None:
    """One mini-batch under each layout of ``cases`` (name -> minibatches keywords + ``agg``):
    save the old log-probs of every response token, the reduced loss report and the gradients.
    No optimizer step is taken, so every case sees the same weights."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.rl.batch import minibatches
    from megatron_klear.rl.config import AlgoConfig, RLConfig
    from megatron_klear.rl.loss import REPORT_KEYS, rl_loss_fn
    from megatron_klear.rl.update import compute_old_logprobs
    from megatron_klear.training.state import OptimConfig
    from megatron_klear.training.step import forward_backward, reduce_reports

    init_distributed(ParallelConfig(tp=tp, pp=pp), seed=7)
    try:
        cfg, state = hf_train_state(hf_dir, OptimConfig())
        groups = rl_groups(cfg.vocab_size)
        seqs = [s for g in groups for s in g]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        result = {}
        for name, case in cases.items():
            case = dict(case)
            algo = AlgoConfig(agg=case.pop("agg", "token-mean"), entropy_coef=0.01)
            rl = dataclasses.replace(RLConfig(output_dir=out), algo=algo)
            [mini] = minibatches(groups, len(groups), dp, dp_rank, max_seq_len=cfg.max_position_embeddings, **case)
            compute_old_logprobs(state, [mini], rl, cfg.vocab_size)
            reps = forward_backward(state, mini.micro, rl_loss_fn(cfg.vocab_size, algo, mini, 1.0, "torch"))
            logp = {}
            if ps.is_pipeline_last_stage():
                for i, (k, row, a) in mini.placement.items():
                    p, r = len(seqs[i].prompt_ids), len(seqs[i].response_ids)
                    logp[i] = mini.micro[k].old_lp[row, a + p - 1 : a + p + r - 1].clone()
            result[name] = dict(
                logp=logp,
                report=reduce_reports(reps, REPORT_KEYS),
                grads=dp_full_grads(state),
                shapes=[mb.shape for mb in mini.micro],
            )
        torch.save(result, f"{out}.{torch.distributed.get_rank()}")
    finally:
        destroy_distributed()


def env_worker(timeout_minutes: int, out: str) -> None:
    """Record what a spawned child sees: its CUDA_VISIBLE_DEVICES, GPU count, group timeouts."""
    import os

    from megatron.core import parallel_state as ps

    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(timeout_minutes=timeout_minutes))
    try:
        groups = {
            "world": torch.distributed.group.WORLD,
            "tp": ps.get_tensor_model_parallel_group(),
            "dp": ps.get_data_parallel_group(),
        }
        timeouts = {k: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for k, g in groups.items()}
        seen = dict(cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"), gpus=torch.cuda.device_count())
        torch.save(dict(seen, timeouts=timeouts), out)
    finally:
        destroy_distributed()


class _TENormLike(torch.nn.RMSNorm):
    """A torch RMSNorm with the extra state Transformer Engine's RMSNorm has (TE 2.9-2.11
    ``ops/op.py``: an empty uint8 tensor without FP8), so Megatron's own sharded-state-dict code
    adds the ``_extra_state`` entries a TE model has. TE itself does not install on CPU."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass


def te_extra_state_worker(ckpt: str, out: str) -> None:
    """Load a converted (local-spec) checkpoint into a model whose norms carry TE's extra state."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.errors import CheckpointError
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.qwen3 import ModelOptions, build_model

    init_distributed(ParallelConfig())
    try:
        cfg = Qwen3Config.from_dict(json.loads((Path(ckpt) / "config.json").read_text()))
        plain = build_model(cfg, ModelOptions(use_te=False), init_weights=False)
        load_model(plain, ckpt)
        model = build_model(cfg, ModelOptions(use_te=False))
        # TE's spec builds these three as TENorm (te.pytorch.RMSNorm); its linears' extra state
        # is in local-spec checkpoints already (Megatron's parallel linears keep a None there).
        norms = [model.decoder.final_layernorm]
        for layer in model.decoder.layers:
            norms += [layer.self_attention.q_layernorm, layer.self_attention.k_layernorm]
        for norm in norms:
            norm.__class__ = _TENormLike
        extra = sorted(k for k, v in model.sharded_state_dict().items() if k.endswith("._extra_state"))
        load_model(model, ckpt)
        same = all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
        # anything else the checkpoint lacks is still an error
        model.decoder.final_layernorm.register_buffer("scale", torch.ones(cfg.hidden_size))
        try:
            load_model(model, ckpt)
            error = None
        except CheckpointError as e:
            error = str(e)
        torch.save(dict(extra=extra, same=same, error=error), out)
    finally:
        destroy_distributed()


def overlap_save_worker(hf_dir: str, root: str, out: str) -> None:
    """DP=2 with the overlapped parameter all-gather: one step, then a checkpoint save (outside
    any forward); the saved weights must be the updated ones on every rank's shard."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.ops.loss import nll_loss
    from megatron_klear.training.batches import MicroBatch
    from megatron_klear.training.checkpoint import save_checkpoint
    from megatron_klear.training.run_state import RunState
    from megatron_klear.training.step import forward_backward, optimizer_step

    init_distributed(ParallelConfig(), seed=3)
    try:
        cfg, ts = hf_train_state(hf_dir)
        assert ts.model.ddp_config.overlap_param_gather and ts.model.ddp_config.overlap_grad_reduce
        g = torch.Generator().manual_seed(torch.distributed.get_rank())
        ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
        labels = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=ids.dtype)], 1)
        mask = torch.ones(1, 16)
        mask[:, -1] = 0
        mb = MicroBatch(ids, torch.arange(16)[None], labels, mask)
        forward_backward(ts, [mb], nll_loss(cfg.vocab_size, "torch"))
        optimizer_step(ts)
        before_sync = [p.detach().clone() for p in ts.module.parameters()]
        ckpt = save_checkpoint(ts, Path(root), RunState(step=1))
        current = [p.detach().clone() for p in ts.module.parameters()]
        saved = build_model(cfg, ModelOptions(), init_weights=False)
        load_model(saved, ckpt)
        torch.save(
            dict(
                stale=sum(not torch.equal(a, b) for a, b in zip(before_sync, current)),
                saved_equal=all(torch.equal(a, b) for a, b in zip(saved.parameters(), current)),
            ),
            f"{out}.{torch.distributed.get_rank()}",
        )
    finally:
        destroy_distributed()


def reinit_layout(tp: int, pp: int, ep: int = 1, etp: int = 1) -> None:
    """Megatron's model-parallel groups of another layout in the same process group, so that one
    start-up checks several layouts."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def moe_layouts_worker(layouts: list, ckpts: list[str], ids_path: str, bucket_bytes: int, out_dir: str) -> None:
    """For each (tp, pp, ep, etp) layout and checkpoint: the logits (``forward_logits``) and the
    gathered HF buckets, saved from rank 0 as ``{name}_{tp}{pp}{ep}{etp}.pt``."""
    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.forward import forward_logits, send_to_rank0
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.sync.gather import gather_hf_buckets

    init_distributed(ParallelConfig())
    try:
        ids = torch.tensor(json.loads(Path(ids_path).read_text()))
        for tp, pp, ep, etp in layouts:
            reinit_layout(tp, pp, ep, etp)
            for ck in ckpts:
                cfg = Qwen3Config.from_dict(json.loads((Path(ck) / "config.json").read_text()))
                model = build_model(cfg, ModelOptions(), init_weights=False)
                load_model(model, ck)
                logits = send_to_rank0(forward_logits(model, ids, cfg.vocab_size))
                buckets = [[(n, t.clone()) for n, t in b] for b in gather_hf_buckets(model, cfg, bucket_bytes)]
                if torch.distributed.get_rank() == 0:
                    out = Path(out_dir) / f"{Path(ck).name}_{tp}{pp}{ep}{etp}.pt"
                    torch.save(dict(logits=logits, buckets=buckets), out)
                else:
                    assert buckets == [], "buckets must come out on rank 0 only"
    finally:
        destroy_distributed()


def moe_sglang_worker(hf_dir: str, engine_cfg: dict, out: str) -> None:
    """EP=2 on 2 ranks: train, sync into a real SGLang server (distributed mode, gloo), probe;
    train, sync again through a colocated engine on the same server (every rank builds its
    buckets, ``sync.colocated``), probe. Saves the probe differences and sync stats."""
    import dataclasses

    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.inference.sglang import SGLangConfig, SGLangEngine
    from megatron_klear.ops.loss import nll_loss
    from megatron_klear.sync.weights import probe_logprob_diff, sync_weights
    from megatron_klear.training.batches import MicroBatch
    from megatron_klear.training.step import forward_backward, optimizer_step

    init_distributed(ParallelConfig(expert_parallel=2), seed=7)
    rank0 = torch.distributed.get_rank() == 0
    engines = []
    try:
        cfg, state = hf_train_state(hf_dir)
        g = torch.Generator().manual_seed(torch.distributed.get_rank())
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        labels = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=ids.dtype)], 1)  # the last predicts nothing
        mask = torch.ones(2, 16)
        mask[:, -1] = 0
        mb = MicroBatch(ids, torch.arange(16)[None].expand(2, -1), labels, mask)

        def train(steps: int) -> None:
            for _ in range(steps):
                forward_backward(state, [mb], nll_loss(cfg.vocab_size, "torch"))
                optimizer_step(state)
            state.sync_params()

        result = {}
        dist_engine = SGLangEngine(SGLangConfig(**engine_cfg)) if rank0 else None
        engines.append(dist_engine)
        probe = list(range(20, 32))

        def diff(engine, max_diff: float | None = 2e-3) -> float:
            # The run's own check: above max_diff, one re-probe (new samples: seeds have no effect
            # on SGLang's CPU engine), then SyncError. A sampled token whose top-k routing is
            # nearly tied in the trained model can lift one probe's mean to ~5e-3 (seen once).
            return probe_logprob_diff(
                engine, state.module, cfg, probe, temperature=1.0, new_tokens=8, seed=3, max_diff=max_diff
            )

        result["initial"] = diff(dist_engine)  # the same weights on both sides: the engine's numerics
        train(2)
        result["before_sync"] = diff(dist_engine, None)  # the server still has the initial weights
        stats = sync_weights(dist_engine, state.module, cfg, "step-2", bucket_bytes=20_000)
        result.update(distributed=diff(dist_engine), buckets=stats.buckets, tensors=stats.tensors)
        colo = None
        if rank0:
            urls = [s.url for s in dist_engine.servers]
            fields = dict(mode="colocated", launch=False, server_urls=urls, router_url=dist_engine.router_url)
            colo = SGLangEngine(dataclasses.replace(SGLangConfig(**engine_cfg), **fields))
        train(1)
        stats = sync_weights(colo, state.module, cfg, "step-3", bucket_bytes=20_000)
        result.update(colocated=diff(colo), colocated_buckets=stats.buckets)
        torch.save(result, f"{out}.{torch.distributed.get_rank()}")
    finally:
        for e in engines:
            if e is not None:
                e.shutdown()
        destroy_distributed()


class HostSyncCounter:
    """Counts the calls that read a tensor on the host (a device-to-host sync on a GPU):
    ``Tensor.item``, ``__float__``, ``__int__``, ``__bool__``, ``cpu``, ``tolist``, ``numpy``.
    On CPU nothing stalls, so the calls themselves are counted, each with its caller (the
    innermost frame outside torch and the CPU shim). One caller is left out: Megatron's RNG tracker compares two
    copies of ``torch.get_rng_state()``, CPU tensors on every machine (no device involved)."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy")
    HOST_ONLY = ("megatron/core/tensor_parallel/random.py",)
    PASS_THROUGH = ("/torch/", "megatron_klear/compat.py", "contextlib.py")  # torch, and our CPU shim's mode

    def __init__(self):
        self.count, self.where, self._inside = 0, [], False
        self._saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

    def _wrap(self, name):
        import traceback

        original = self._saved[name]

        def counted(t, *args, **kwargs):
            if self._inside:  # a read inside a read (bool -> item) is the same sync
                return original(t, *args, **kwargs)
            frames = [f for f in traceback.extract_stack()[:-1] if not any(p in f.filename for p in self.PASS_THROUGH)]
            caller = f"{frames[-1].filename}:{frames[-1].lineno}"
            if not any(h in caller for h in self.HOST_ONLY):
                self.count += 1
                self.where.append(f"{name} at {caller}")
            self._inside = True
            try:
                return original(t, *args, **kwargs)
            finally:
                self._inside = False

        return counted

    def __enter__(self):
        for n in self.NAMES:
            setattr(torch.Tensor, n, self._wrap(n))
        return self

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(torch.Tensor, n, f)


def host_sync_worker(hf_dir: str, out: str) -> None:
    """Host syncs of one RL micro-batch (forward, GPPO + SFT loss with its metrics, backward)
    and of one SFT micro-batch, outside debug mode (and, as a check of the counter, inside it);
    then of the once-per-optimizer-step reduction of several micro-batches' reports."""
    import dataclasses
    import os

    from megatron_klear import debug
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.ops.loss import nll_loss
    from megatron_klear.rl.batch import minibatches
    from megatron_klear.rl.config import AlgoConfig, RLConfig
    from megatron_klear.rl.loss import REPORT_KEYS, rl_loss_fn
    from megatron_klear.rl.update import compute_old_logprobs
    from megatron_klear.training.state import OptimConfig
    from megatron_klear.training.step import forward_backward, reduce_reports

    init_distributed(ParallelConfig(), seed=7)
    try:
        cfg, state = hf_train_state(hf_dir, OptimConfig())
        algo = AlgoConfig(entropy_coef=0.01, tis_cap=2.0)  # every term of the loss and its metrics
        rl = dataclasses.replace(RLConfig(output_dir=out), algo=algo)
        [mini] = minibatches(rl_groups(cfg.vocab_size), 3, 1, 0, max_tokens=56, max_seq_len=cfg.max_position_embeddings)
        compute_old_logprobs(state, [mini], rl, cfg.vocab_size)
        loss_fn = rl_loss_fn(cfg.vocab_size, algo, mini, 1.0, "torch")
        result = {}
        for mode in ("0", "1"):
            os.environ[debug.ENV] = mode
            for name, fn in (("rl", loss_fn), ("sft", nll_loss(cfg.vocab_size, "torch"))):
                for n in (1, len(mini.micro)):  # one micro-batch, and all of them
                    with HostSyncCounter() as counter:
                        reports = forward_backward(state, mini.micro[:n], fn)
                    result[mode, name, n] = counter
        os.environ[debug.ENV] = "0"
        reports = forward_backward(state, mini.micro, loss_fn)
        with HostSyncCounter() as reduce:
            reduced = reduce_reports(reports, REPORT_KEYS)
        result = {k: (c.count, c.where) for k, c in result.items()}
        result.update(
            micro_batches=len(mini.micro),
            reduce=reduce.count,
            on_device=all(isinstance(r[k], torch.Tensor) for r in reports for k in REPORT_KEYS),
            reduced=reduced,
        )
        torch.save(result, f"{out}.0")
    finally:
        destroy_distributed()


def yarn_worker(hf_dir: str, plain_dir: str, ckpt: str, ids_path: str, docs: list[int], out: str) -> None:
    """A YaRN model at TP=2 (2 ranks), past its original context: logits of whole rows (from the
    HF weights and from a converted checkpoint), logits of one packed row of ``docs``, the weight
    sync + probe into HF engines (the YaRN model's, and the same weights without YaRN), and
    Megatron's THD RoPE under a 2-rank context-parallel group. Rank 0 saves what it saw."""
    import numpy as np
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    from megatron_klear.checkpoint.megatron_ckpt import load_model
    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.models.forward import forward_logits, gather_vocab
    from megatron_klear.models.qwen3 import ModelOptions, build_model
    from megatron_klear.sync.weights import probe_logprob_diff, sync_weights
    from megatron_klear.training.batches import MicroBatch, context_parallel_index
    from megatron_klear.training.step import forward_backward

    init_distributed(ParallelConfig(tp=2), seed=7)
    try:
        cfg, state = hf_train_state(hf_dir)
        rank0 = torch.distributed.get_rank() == 0
        ids = torch.tensor(json.loads(Path(ids_path).read_text()))
        result = {"rows": forward_logits(state.module, ids, cfg.vocab_size)}
        converted = build_model(cfg, ModelOptions(), init_weights=False)
        load_model(converted, ckpt)
        result["rows_converted"] = forward_logits(converted, ids, cfg.vocab_size)

        cu = np.cumsum([0, *docs])
        packed = ids[0, : cu[-1]][None]
        positions = torch.cat([torch.arange(d) for d in docs])[None]  # restarting at every document
        last = torch.zeros_like(packed, dtype=torch.bool)
        last[0, torch.from_numpy(cu[1:] - 1)] = True  # a document's last position predicts nothing
        labels = torch.cat([packed[:, 1:], packed[:, :1]], 1).masked_fill(last, 0)
        mb = MicroBatch(packed, positions, labels, (~last).float(), cu_seqlens=[cu])
        seen = []

        def keep_logits(logits, mb):
            seen.append(gather_vocab(logits.float(), cfg.vocab_size))
            return logits.sum() * 0, torch.tensor(1), {}

        forward_backward(state, [mb], keep_logits, forward_only=True)
        result["packed"] = seen[0][0]

        probe = ids[1, :24].tolist()
        engines = {"yarn": HFEngine(hf_dir), "plain": HFEngine(plain_dir)} if rank0 else {"yarn": None, "plain": None}
        for name, engine in engines.items():
            sync_weights(engine, state.module, cfg, "v1")
            result[f"probe_{name}"] = probe_logprob_diff(engine, state.module, cfg, probe, new_tokens=32)

        # Megatron's THD RoPE (packed, context parallel = 2) with the model's own YaRN table
        cp = torch.distributed.new_group([0, 1])
        total = int(cu[-1])
        g = torch.Generator().manual_seed(3)
        t = torch.randn(total, 2, cfg.head_dim, generator=g)
        mine = torch.from_numpy(context_parallel_index(cu, 2, torch.distributed.get_rank()))
        freqs, _ = state.module.rotary_pos_emb(max(docs))
        rotated = apply_rotary_pos_emb(
            t[mine],
            freqs,
            config=state.module.config,
            cu_seqlens=torch.from_numpy(cu).int(),
            mscale=_yarn_get_concentration_factor_from_config(state.module.config),
            cp_group=cp,
        )
        result.update(thd_input=t, thd_index=mine, thd_rotated=rotated)
        parts = [None, None]
        torch.distributed.all_gather_object(parts, (mine, rotated))
        if rank0:
            result["thd_parts"] = parts
            torch.save(result, out)
    finally:
        destroy_distributed()


def collective_failure_worker(out: str) -> None:
    """Rank 0 records the real gloo errors of two failed all-reduces: rank 1 silent past the
    2 s timeout, then rank 1 gone (its process exited) in the middle of one."""
    import datetime
    import os
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    dist.barrier()
    if dist.get_rank() == 1:
        time.sleep(4)  # rank 0 times out waiting for us
    errors = {}
    if dist.get_rank() == 0:
        try:
            dist.all_reduce(torch.ones(4))
        except RuntimeError as e:
            errors["silent"] = str(e)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))  # a fresh pair
    dist.barrier(group=group)
    if dist.get_rank() == 1:
        os._exit(0)  # gone: no goodbye to rank 0's pending all-reduce
    try:
        dist.all_reduce(torch.ones(4), group=group)
    except RuntimeError as e:
        errors["gone"] = str(e)
    Path(out).write_text(json.dumps(errors))
    os._exit(0)  # the default group's store would wait for rank 1 at destroy


def tp_attributes_worker(hf_dir: str, out: str) -> None:
    """Every parameter's tensor-parallel attributes, built with Megatron's random
    initialisation and without it (the weights loaded next): saved from each rank."""
    import os

    from megatron_klear.distributed import ParallelConfig, destroy_distributed, init_distributed
    from megatron_klear.models.config import load_hf_config
    from megatron_klear.models.qwen3 import build_model

    init_distributed(ParallelConfig(tp=int(os.environ["WORLD_SIZE"])))
    try:
        cfg = load_hf_config(hf_dir)
        seen = {}
        for init in (True, False):
            model = build_model(cfg, init_weights=init)
            seen[init] = {
                n: tuple(getattr(p, a, None) for a in ("tensor_model_parallel", "partition_dim", "partition_stride"))
                for n, p in model.named_parameters()
            }
        torch.save(seen, f"{out}.{torch.distributed.get_rank()}")
    finally:
        destroy_distributed()
