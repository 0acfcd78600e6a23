"""The GPPO RL loop on Megatron-Core.

    torchrun --nproc-per-node N -m megatron_klear.rl --config examples/tiny/rl_math.yaml [key=value ...]

One step, top to bottom:
  1. rollouts (global rank 0): prompts -> G samples each -> rewards -> group advantages ->
     zero-advantage filtering / dynamic sampling; the result is broadcast to every rank;
  2. old log-probs: the trainer scores every kept response before any update;
  3. one optimizer step per mini-batch: GPPO (token-mean, global normaliser) + alpha x NLL on
     correct responses (+ optional entropy bonus);
  4. sync the weights into the engine and check engine vs trainer log-probs on a probe;
  5. log, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_klear.cli import run_config_entry
from megatron_klear.config import load_config, to_dict
from megatron_klear.data.chat import render_prompt
from megatron_klear.data.rl import CurationConfig, load_rl_prompts
from megatron_klear.distributed import ParallelConfig, broadcast_object, destroy_distributed, init_distributed, is_main
from megatron_klear.errors import ConfigError, EngineError, StaleEngineError
from megatron_klear.inference.base import RolloutEngine
from megatron_klear.inference.hf import HFEngine
from megatron_klear.inference.sglang import SGLangConfig, SGLangEngine
from megatron_klear.models.config import validate_parallel
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.rl.batch import minibatches
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.evaluate import evaluate
from megatron_klear.rl.loss import REPORT_KEYS, old_logprob_fn, rl_loss_fn
from megatron_klear.rl.rollout import Collector, PromptStream, RewardConfigs, groups_from_json, groups_to_json
from megatron_klear.sft import SFTConfig
from megatron_klear.sft import train as sft_train
from megatron_klear.sync.weights import probe_logprob_diff, sync_weights
from megatron_klear.training.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_klear.training.guards import maybe_crash, stop_on_nonfinite, weights_finite
from megatron_klear.training.metrics import MetricsLogger
from megatron_klear.training.run import model_options, model_source, prepare_assets, tokenizer_dir
from megatron_klear.training.state import build_train_state
from megatron_klear.training.step import forward_backward, optimizer_step, reduce_reports


def build_rollout_engine(cfg: RLConfig, model_dir: str) -> RolloutEngine:
    r = cfg.rollout
    if r.engine == "hf":
        return HFEngine(model_dir, device=r.hf_device, dtype=r.hf_dtype, max_batch=r.hf_max_batch)

    return SGLangEngine(sglang_config(cfg, model_dir))


def sglang_config(cfg: RLConfig, model_dir: str, **fields):
    """``rollout.sglang`` as an SGLangConfig (the trainer's and the Slurm launcher's view)."""

    values = {"model_path": model_dir, "log_dir": str(Path(cfg.output_dir) / "sglang_logs"), **cfg.rollout.sglang}
    try:
        sg = SGLangConfig(**{**values, **fields})
    except TypeError as e:
        raise ConfigError(f"rollout.sglang: {e}") from None
    sg.validate()
    return sg


def reward_configs(cfg: RLConfig):

    try:
        return RewardConfigs(
            MathRewardConfig(**cfg.reward.math), CodeRewardConfig(**cfg.reward.code), cfg.rollout.reward_workers
        )
    except TypeError as e:
        raise ConfigError(f"reward.math / reward.code: {e}") from None


def load_prompts(cfg: RLConfig):
    """(train prompts, eval prompts, curation stats); eval prompts are excluded from training."""

    evals: list = []
    if cfg.data.eval:
        evals, _ = load_rl_prompts(cfg.data.eval, CurationConfig(min_code_tests=0, dedup=False))
        if cfg.eval.max_prompts:
            evals = evals[: cfg.eval.max_prompts]
    cur = CurationConfig(min_code_tests=cfg.data.min_code_tests, eval_prompts=[p.prompt_text for p in evals])
    train, stats = load_rl_prompts(cfg.data.train, cur)
    return train, evals, stats


def bootstrap(cfg: RLConfig) -> None:
    """Run the config named by ``bootstrap`` (an SFT or an earlier RL stage) first when
    ``model.hf`` does not exist yet: its run must export that directory."""
    if cfg.bootstrap is None or cfg.model.hf is None or (Path(cfg.model.hf) / "config.json").is_file():
        return
    import yaml

    raw = yaml.safe_load(Path(cfg.bootstrap).read_text()) or {}
    if is_main():
        print(f"{cfg.model.hf} is missing: running {cfg.bootstrap} first", flush=True)
    if "rollout" in raw or "algo" in raw:
        train(load_config(RLConfig, cfg.bootstrap, []))
    else:
        sft_train(load_config(SFTConfig, cfg.bootstrap, []))
    destroy_distributed()
    if not (Path(cfg.model.hf) / "config.json").is_file():
        raise ConfigError(f"bootstrap {cfg.bootstrap} ran but model.hf={cfg.model.hf} still does not exist")


def train(cfg: RLConfig) -> dict:
    """Run (or resume) RL; returns the last step's metrics."""
    from megatron.core import parallel_state as ps

    bootstrap(cfg)
    init_distributed(ParallelConfig(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel), seed=cfg.seed)
    prepare_assets(cfg)
    hf_cfg, init_weights = model_source(cfg)
    validate_parallel(hf_cfg, cfg.parallel.tp, cfg.parallel.pp)
    r, a = cfg.rollout, cfg.algo
    if r.max_prompt_len + r.max_response_len > hf_cfg.max_position_embeddings:
        raise ConfigError(
            f"rollout.max_prompt_len + rollout.max_response_len = {r.max_prompt_len + r.max_response_len} exceeds "
            f"the model's max_position_embeddings={hf_cfg.max_position_embeddings}"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg))
    train_prompts, eval_prompts, curation = load_prompts(cfg)
    rewards = reward_configs(cfg)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    opts = model_options(cfg)
    resume_from = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    steps_of_updates = cfg.train_steps * (cfg.data.prompts_per_step // cfg.data.mini_batch_prompts)
    engine = build_train_state(
        hf_cfg, opts, cfg.optim, steps_of_updates, init_weights=None if resume_from else init_weights
    )
    state: dict = {"step": 0, "prompt_epoch": 0, "prompt_index": 0, "buffer": []}
    if resume_from is not None:
        state.update(load_checkpoint(engine, resume_from))
    rank0 = is_main()
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        if resume_from is not None:
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
        print(
            f"RL: {len(train_prompts)} train prompts {curation}, {len(eval_prompts)} eval prompts | "
            f"{cfg.data.prompts_per_step} prompts x {r.n_samples} samples per step, mini-batches of "
            f"{cfg.data.mini_batch_prompts} | dp={dp} tp={cfg.parallel.tp} pp={cfg.parallel.pp} | "
            f"algo={a.loss} alpha={a.sft_alpha} | engine={r.engine}",
            flush=True,
        )

    rollout = build_rollout_engine(cfg, tokenizer_dir(cfg)) if rank0 else None
    stream = PromptStream(train_prompts, tokenizer, cfg.data.seed, r.max_prompt_len)
    collector = Collector(rollout, tokenizer, stream, rewards, cfg) if rank0 else None
    probe = render_prompt(tokenizer, (eval_prompts or train_prompts)[0].messages)[: min(128, r.max_prompt_len)]
    bucket = r.bucket_mb * 2**20

    def sync(version: str) -> dict:
        t0 = time.time()
        if rank0 and r.release_memory:
            rollout.resume_memory(("weights",))
        st = sync_weights(rollout, engine.module, hf_cfg, version, bucket)
        if rank0 and r.release_memory:
            rollout.resume_memory(("kv_cache", "cuda_graph"))
        m = {"time/sync_s": time.time() - t0, "sync/gb": st.bytes / 1e9, "sync/buckets": st.buckets}
        if r.check_consistency:
            m["rollout/logprob_diff"] = probe_logprob_diff(rollout, engine.module, hf_cfg, probe)
        return m

    def run_eval(step: int) -> dict:
        res = None
        if rank0 and eval_prompts:
            ev = cfg.eval
            res = evaluate(
                rollout,
                tokenizer,
                eval_prompts,
                rewards,
                k=ev.k,
                temperature=ev.temperature,
                top_p=ev.top_p,
                max_new_tokens=ev.max_new_tokens or r.max_response_len,
                seed=cfg.seed,
                out_jsonl=out / "eval.jsonl",
                step=step,
            )
            print(f"eval @ step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
        return broadcast_object(res) or {}

    def collect(step: int):
        """Rollouts on rank 0, shared with all; a stale engine gets one full sync and a retry."""
        for attempt in range(2):
            res: Any = None
            if rank0:
                try:
                    pos = (state["prompt_epoch"], state["prompt_index"])
                    dump = out / "rollouts" / f"step_{step:06d}.jsonl" if r.dump else None
                    res = ("ok", collector.collect(step, pos, groups_from_json(state["buffer"]), dump))
                except StaleEngineError as e:
                    res = ("stale", str(e))
                except EngineError as e:
                    res = ("error", str(e))
            res = broadcast_object(res)
            if res[0] == "ok":
                return res[1]
            if res[0] == "stale" and attempt == 0:
                sync(f"step-{step - 1}-resync")
                continue
            raise EngineError(f"rollout engine failed at step {step}: {res[1]} (last checkpoint is intact)")

    logger = MetricsLogger(
        out,
        cfg.train_steps,
        state["step"],
        tensorboard=cfg.log.tensorboard,
        wandb_project=cfg.log.wandb_project,
        run_name=out.name,
        config=to_dict(cfg),
        desc="rl",
    )
    metrics: dict = {}
    step = state["step"]
    last_eval: tuple[int, dict] = (-1, {})
    try:
        first = sync(f"step-{step}")
        if cfg.eval.at_start and step == 0:
            first.update(run_eval(0))
        if rank0:
            print("initial sync: " + " ".join(f"{k}={v:.4g}" for k, v in first.items()), flush=True)
        while step < cfg.train_steps:
            t_step = time.time()
            groups, metrics, pos, buffer = collect(step + 1)
            maybe_crash("rollout", step + 1)
            if rank0 and r.release_memory:
                rollout.release_memory(("weights", "kv_cache", "cuda_graph"))
            minis = minibatches(groups, cfg.data.mini_batch_prompts, dp, dp_rank, cfg.data.micro_batch_size)

            t0 = time.time()  # old log-probs for every mini-batch before the first update
            old_fn = old_logprob_fn(hf_cfg.vocab_size, r.temperature, cfg.model.logprob_impl)
            for mini in minis:
                reps = forward_backward(engine, mini.micro, old_fn, forward_only=True)
                for i, mb in enumerate(mini.micro):
                    mb["old_lp"] = reps[i]["logp"] if reps else torch.zeros_like(mb["engine_lp"])
            engine.model.train()
            metrics["time/old_logprobs_s"] = time.time() - t0

            t0 = time.time()
            sums = dict.fromkeys(REPORT_KEYS, 0.0)
            grad_norms = []
            norm_total = 0
            for mini in minis:
                loss_fn = rl_loss_fn(hf_cfg.vocab_size, a, mini, r.temperature, cfg.model.logprob_impl)
                reps = forward_backward(engine, mini.micro, loss_fn)
                applied, grad_norm = optimizer_step(engine)
                rep = reduce_reports(reps, REPORT_KEYS)
                if rep["nonfinite"] > 0 or not math.isfinite(rep["pg_sum"]) or not math.isfinite(grad_norm):
                    stop_on_nonfinite(out, step + 1, grad_norm=grad_norm, report=rep, rollout=metrics)
                grad_norms.append(grad_norm)
                norm_total += mini.num_tokens if a.agg == "token-mean" else mini.num_seqs
                for k in REPORT_KEYS:
                    sums[k] += rep[k]
            metrics["time/train_s"] = time.time() - t0
            if minis and not weights_finite(engine.module):  # never push poisoned weights into the engine
                stop_on_nonfinite(out, step + 1, problem="non-finite weights", grad_norms=grad_norms, rollout=metrics)
            step += 1
            state.update(step=step, prompt_epoch=pos[0], prompt_index=pos[1], buffer=groups_to_json(buffer))
            metrics.update(sync(f"step-{step}"))
            ntok = max(sums["tokens"], 1.0)
            metrics.update(
                {
                    "loss/pg": sums["pg_sum"] / max(norm_total, 1),
                    "loss/clipfrac_high": sums["clipfrac_high"] / ntok,
                    "loss/clipfrac_low": sums["clipfrac_low"] / ntok,
                    "loss/dual_clipfrac": sums["dual_clipfrac"] / ntok,
                    "loss/ppo_kl": sums["ppo_kl"] / ntok,
                    "loss/entropy": sums["entropy"] / ntok,
                    "loss/sft_nll": sums["sft_nll"] / max(sums["correct_tokens"], 1.0),
                    "loss/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
                    "rollout/train_engine_diff": sums["engine_diff"] / ntok,
                    "train/updates": len(minis),
                    "train/tokens": sums["tokens"],
                    "train/normaliser": norm_total,
                    "train/lr": engine.optimizer.param_groups[0]["lr"],
                }
            )
            if not minis and rank0:
                print(f"step {step}: every group was filtered; no update this step", flush=True)
            if cfg.eval.interval and step % cfg.eval.interval == 0:
                last_eval = (step, run_eval(step))
                metrics.update(last_eval[1])
            dt = time.time() - t_step
            gen_tokens = metrics.get("response/length_mean", 0.0) * metrics.get("rollout/samples", 0)
            metrics.update({"time/step_s": dt, "perf/tokens_per_s": gen_tokens / dt})
            logger.log(step, metrics, console=step % cfg.log.interval == 0 or step == cfg.train_steps)
            logger.advance()
            maybe_crash("step", step)
            if step % cfg.checkpoint.save_interval == 0 or step == cfg.train_steps:
                save_checkpoint(engine, ckpt_root, step, state, cfg.checkpoint.keep_last)
        if cfg.eval.at_end:
            # The interval evaluation may just have run at this very step: reuse it.
            final = last_eval[1] if last_eval[0] == step else run_eval(step)
            if rank0 and final:
                (out / "final_eval.json").write_text(json.dumps(dict(step=step, **final), indent=1))
    finally:
        logger.close()
        if rollout is not None:
            rollout.shutdown()
    if cfg.checkpoint.export_hf and rank0:
        export_hf(tokenizer_dir(cfg), ckpt_root, out / "hf")
    if dist.is_initialized():
        dist.barrier()
    return metrics


def main(argv: Optional[list[str]] = None) -> int:

    return run_config_entry(RLConfig, train, __doc__, argv)
