"""The GPPO RL loop on Megatron-Core.

    torchrun --nproc-per-node N -m megatron_klear.rl --config examples/tiny/rl_math.yaml [key=value ...]

One step, top to bottom (``RLRun.train``):
  1. collect (global rank 0): prompts -> G samples each -> rewards -> group advantages ->
     zero-advantage filtering / dynamic sampling; the batch is broadcast to every rank. With
     ``rollout.overlap = K`` the batches of the next K steps are then generated (in a thread of
     rank 0, ``rl.ahead``) on the engine's current weights while this step trains;
  2. update: the trainer recomputes old log-probs, then one optimizer step per mini-batch of
     GPPO (token-mean, global normaliser) + alpha x NLL on correct responses; tokens sampled by
     older weights take their ratio against the engine's log-probs of those weights (``rl.loss``);
  3. sync the weights into the inference engine (once no rollout is in flight) and check engine
     vs trainer log-probs on a probe;
  4. log, evaluate, checkpoint (with the batches generated ahead, so a resume is exact).
``RLRun`` is the run's lifecycle (``training.lifecycle``: checks, process groups, lock, resume,
logs, export) with what RL sets up once (prompts, inference engine, collector) and names each of
these phases. Running an SFT stage first when the model is missing (``bootstrap``) is the
pipeline's job (``megatron_klear.pipeline``), not this module's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from megatron_klear.cli import DryRun
from megatron_klear.data.chat import render_prompt
from megatron_klear.data.rl import CurationConfig, RLPrompt, load_rl_prompts
from megatron_klear.distributed import broadcast_object, is_main
from megatron_klear.errors import ConfigError, EngineError, SandboxError, StaleEngineError
from megatron_klear.inference.base import InferenceEngine
from megatron_klear.inference.hf import HFEngine
from megatron_klear.inference.rollout_env import check_rollout_env
from megatron_klear.inference.sglang import SGLangEngine
from megatron_klear.inference.sglang_servers import check_training_positions
from megatron_klear.models.config import Qwen3Config, validate_training_layout
from megatron_klear.rewards.code import CodeRewardConfig, check_sandbox
from megatron_klear.rl.ahead import RolloutBatch, RolloutQueue
from megatron_klear.rl.batch import PAD_TO, layout_metrics, minibatches
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.evaluate import evaluate
from megatron_klear.rl.rollout import BUFFER_SCHEMA, Collector, Group, PromptStream, groups_from_rows, groups_to_rows
from megatron_klear.rl.update import update_policy
from megatron_klear.sync.weights import probe_logprob_diff, sync_into_engine
from megatron_klear.training.guards import maybe_crash
from megatron_klear.training.lifecycle import RunInputs, TrainingRun
from megatron_klear.training.run import check_data_files, starting_config
from megatron_klear.training.run_state import DataPosition
from megatron_klear.training.rundir import writable_problem


def train(cfg: RLConfig) -> dict:
    """Run (or resume) RL on ``model``; returns the last step's metrics."""
    with RLRun(cfg) as run:
        return run.train()


def build_inference_engine(cfg: RLConfig) -> InferenceEngine:
    """The engine ``rollout.engine`` names, on the run's model."""
    r = cfg.rollout
    if r.engine == "hf":
        return HFEngine(cfg.model.tokenizer_dir, device=r.hf_device, dtype=r.hf_dtype, max_batch=r.hf_max_batch)
    return SGLangEngine(cfg.sglang_config())


def check_code_sandbox(code_cfg: CodeRewardConfig, prompts: list[RLPrompt]) -> None:
    """Collective: with code prompts, rank 0 runs a known-good and a known-bad program through
    the sandbox (``rewards.code.check_sandbox``) and prints the backend and its memory limit;
    every rank raises its SandboxError."""
    problem = None
    if is_main() and any(p.ability == "code" for p in prompts):
        try:
            print(f"sandbox: {check_sandbox(code_cfg)}", flush=True)
        except SandboxError as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem is not None:
        raise SandboxError(problem)


def load_prompts(cfg: RLConfig) -> tuple[list[RLPrompt], list[RLPrompt], dict]:
    """(train prompts, eval prompts, curation stats); eval prompts are excluded from training."""
    evals: list = []
    bad = cfg.data.max_bad_fraction
    if cfg.data.eval:
        evals, _ = load_rl_prompts(cfg.data.eval, CurationConfig(min_code_tests=0, dedup=False), max_bad_fraction=bad)
        if cfg.eval.max_prompts:
            evals = evals[: cfg.eval.max_prompts]
    cur = CurationConfig(min_code_tests=cfg.data.min_code_tests, eval_prompts=[p.prompt_text for p in evals])
    train_prompts, stats = load_rl_prompts(cfg.data.train, cur, max_bad_fraction=bad)
    return train_prompts, evals, stats


def check_model_fits(cfg: RLConfig, hf_cfg: Qwen3Config) -> None:
    """The parallel layout divides the model, and prompt + response fit its positions."""
    validate_training_layout(hf_cfg, cfg.parallel)
    check_moe_aux_loss(cfg, hf_cfg)
    r = cfg.rollout
    if r.max_prompt_len + r.max_response_len > hf_cfg.max_position_embeddings:
        raise ConfigError(
            f"rollout.max_prompt_len + rollout.max_response_len = {r.max_prompt_len + r.max_response_len} exceeds "
            f"the model's max_position_embeddings={hf_cfg.max_position_embeddings}"
        )
    if cfg.rollout.engine == "sglang":
        check_training_positions(cfg.rollout.sglang, hf_cfg, r.max_prompt_len + r.max_response_len)


def check_moe_aux_loss(cfg: RLConfig, hf_cfg: Qwen3Config) -> None:
    """Megatron scales the router's load-balancing gradient per token, like a token-sum loss;
    under a per-sequence normaliser it would grow with the sequence length."""
    if hf_cfg.moe is None or cfg.algo.agg == "token-mean":
        return
    coef = hf_cfg.moe.router_aux_loss_coef if cfg.model.moe_aux_loss_coef is None else cfg.model.moe_aux_loss_coef
    if coef > 0:
        raise ConfigError(
            f"algo.agg={cfg.algo.agg} with the MoE load-balancing loss on (model.moe_aux_loss_coef: {coef}): "
            "Megatron scales its gradient per token, so it needs algo.agg=token-mean; or set model.moe_aux_loss_coef=0"
        )


class RLRun(TrainingRun):
    """One RL run's state between steps. Every method is collective (all ranks call it) unless
    it says rank 0; the inference engine, collector and evaluation live on global rank 0."""

    kind = "rl"

    def __init__(self, cfg: RLConfig):
        super().__init__(cfg)
        self.cfg: RLConfig = cfg
        self.engine: Optional[InferenceEngine] = None
        self.collector: Optional[Collector] = None
        self.rollouts: Optional[RolloutQueue] = None  # rank 0: the batches being / already generated
        self.engine_step = -1  # steps trained into the engine's weights (-1: not synced yet)
        self.last_eval: tuple[int, dict] = (-1, {})

    # -- the lifecycle's hooks -------------------------------------------------------------
    def inputs(self) -> RunInputs:
        d = self.cfg.data
        bootstrapped = self.cfg.bootstrap is not None
        return RunInputs(d.train + d.eval, d.generate, d.train, d.synthetic, model_will_exist=bootstrapped)

    def check_layout(self) -> None:
        from megatron.core import parallel_state as ps

        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def check_environment(self) -> None:
        if self.cfg.rollout.engine == "sglang":  # before any server starts: the rollout Python, the GPUs
            check_sglang_launch(self.cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def check_model(self, hf_cfg: Qwen3Config) -> None:
        check_model_fits(self.cfg, hf_cfg)

    def load_data(self) -> None:
        """The tokenizer and the prompts; with code prompts, the sandbox is checked before the model is built."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.tokenizer_dir)
        self.train_prompts, self.eval_prompts, self.curation = load_prompts(self.cfg)
        check_code_sandbox(self.cfg.reward.code, self.train_prompts + self.eval_prompts)

    def total_steps(self) -> int:
        return self.cfg.train_steps  # the LR schedule counts RL steps (rl.update)

    def started(self) -> None:
        """Rank 0: the announcement, the inference engine, the collector and its queue (with the
        batches a checkpoint held ahead of training); every rank: the probe."""
        cfg, r = self.cfg, self.cfg.rollout
        if self.rank0:
            self._announce()
            self.engine = build_inference_engine(cfg)
            stream = PromptStream(self.train_prompts, self.tokenizer, cfg.data.seed, r.max_prompt_len)
            self.collector = Collector(self.engine, self.tokenizer, stream, cfg)
            self.rollouts = RolloutQueue(self.collector, self.out / "rollouts" if r.dump else None)
            self._restore_rollouts()
        probe_prompt = (self.eval_prompts or self.train_prompts)[0]
        self.probe = render_prompt(self.tokenizer, probe_prompt.messages)[: min(128, r.max_prompt_len)]

    def _restore_rollouts(self) -> None:
        """Rank 0: the queue continues where the checkpoint's batches (trained and ahead) ended."""
        st = self.state
        buffer = groups_from_rows(st.buffer, st.buffer_schema, self.step)
        ahead = [RolloutBatch.from_row(row) for row in st.ahead]
        pos = (st.position.epoch, st.position.index)
        dropped = self.rollouts.restore(self.step, pos, buffer, ahead, self.cfg.rollout.overlap)
        if dropped:
            print(f"resume: {len(dropped)} batch(es) generated ahead would lag the policy by more than "
                  f"rollout.overlap={self.cfg.rollout.overlap} updates; generating them again", flush=True)  # fmt: skip

    def closing(self) -> None:
        """Stop the rollouts and the engine's servers, however the run ended."""
        stop = self.engine.shutdown if self.engine is not None else None
        if self.rollouts is not None:
            self.rollouts.close(before=stop)  # the engine stops first: nothing waits on a generation
        elif stop is not None:
            stop()

    def save(self) -> None:
        """A checkpoint; on rank 0 its run state holds the batches generated ahead of training."""
        if self.rank0:
            self.state.ahead = self.rollouts.rows()
        super().save()

    def export_sampling(self) -> dict:
        return {"temperature": self.cfg.eval.temperature, "top_p": self.cfg.eval.top_p}

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> dict:
        """Collect -> update -> sync -> log / evaluate / checkpoint until the last step; returns its metrics."""
        metrics: dict = {}
        self.start()  # first sync (+ step-0 eval)
        while self.step < self.cfg.train_steps:
            t0 = time.time()
            groups, metrics = self.collect()  # rank 0 generates, scores, filters; every rank gets the batch
            self.generate_ahead()  # rollout.overlap: the next batches generate while this step trains
            maybe_crash("rollout", self.step + 1)
            self.release_engine_memory()
            metrics.update(self.update(groups, metrics))  # old log-probs, one optimizer step per mini-batch
            self.advance()
            metrics.update(self.sync(f"step-{self.step}"))  # push weights into the engine, check the probe
            metrics.update(self.evaluate_on_schedule())  # every eval.interval steps, and the final one
            self.log_step(metrics, time.time() - t0)
            maybe_crash("step", self.step)
            self.save_on_interval()
            if self.stop_requested():  # checkpointed: the time limit is near (training.lifecycle)
                return metrics
        self.finish()  # final_eval.json
        return metrics

    def _announce(self) -> None:
        cfg, r, a = self.cfg, self.cfg.rollout, self.cfg.algo
        print(
            f"RL: {len(self.train_prompts)} train prompts {self.curation}, {len(self.eval_prompts)} eval prompts | "
            f"{cfg.data.prompts_per_step} prompts x {r.n_samples} samples per step, mini-batches of "
            f"{cfg.data.mini_batch_prompts} | dp={self.dp} tp={cfg.parallel.tp} pp={cfg.parallel.pp} | "
            f"algo={a.loss} alpha={a.sft_alpha} | engine={r.engine} | micro-batches: {self._layout_name()}",
            flush=True,
        )

    def _layout_name(self) -> str:
        d = self.cfg.data
        if d.max_tokens_per_micro_batch is None:
            return f"{d.micro_batch_size} padded sequences"
        return f"packed, at most {d.max_tokens_per_micro_batch} tokens"

    def start(self) -> None:
        """The first weight sync (the engine then holds the trainer's weights) and the step-0 eval,
        logged with the sync's numbers as the row of step 0."""
        first = self.sync(f"step-{self.step}")
        if self.rank0:
            print("initial sync: " + " ".join(f"{k}={v:.4g}" for k, v in first.items()), flush=True)
        if self.step == 0 and self.cfg.eval.at_start:
            first.update(self.evaluate())
            self.logger.log(0, first)

    def collect(self) -> tuple[list[Group], dict]:
        """Rollouts for the next step on rank 0 (generated ahead, or now), shared with all; a
        stale engine gets one full sync and a retry. The prompt position and the buffer it
        reaches wait in ``pending`` until the step is trained (``advance``)."""
        step = self.step + 1
        for attempt in range(2):
            res: Any = None
            if self.rank0:
                try:
                    b = self.rollouts.take(step, self.engine_step)
                    res = ("ok", (b.groups, b.metrics, b.position, b.rest))
                except StaleEngineError as e:
                    self.rollouts.restart_from(step)  # generated again after the resync
                    res = ("stale", str(e))
                except EngineError as e:
                    res = ("error", str(e))
                except SandboxError as e:  # more sandbox failures than reward.code.max_sandbox_failures
                    res = ("sandbox", str(e))
            res = broadcast_object(res)
            if res[0] == "sandbox":
                raise SandboxError(f"step {step}: {res[1]} (last checkpoint is intact)")
            if res[0] == "ok":
                groups, metrics, pos, rest = res[1]
                self.pending = (DataPosition(*pos), groups_to_rows(rest))
                return groups, metrics
            if res[0] == "stale" and attempt == 0:
                self.sync(f"step-{step - 1}-resync")
                continue
            raise EngineError(f"rollout engine failed at step {step}: {res[1]} (last checkpoint is intact)")
        raise AssertionError("unreachable")

    def generate_ahead(self) -> None:
        """Rank 0: start the batches of the steps up to ``rollout.overlap`` after this one on the
        engine's current weights; they lag the policy that trains on them by at most that many
        updates (``rollout/policy_lag``)."""
        if not self.rank0:
            return
        last = min(self.step + 1 + self.cfg.rollout.overlap, self.cfg.train_steps)
        for step in range(self.rollouts.submitted() + 1, last + 1):
            self.rollouts.submit(step, self.engine_step)

    def release_engine_memory(self) -> None:
        """Rank 0: colocated engines free their GPU memory while the trainer trains."""
        if self.rank0 and self.cfg.rollout.release_memory:
            self.engine.release_memory(("weights", "kv_cache", "cuda_graph"))

    def update(self, groups: list[Group], rollout_metrics: dict) -> dict:
        """Old log-probs and the mini-batch updates on this step's groups."""
        d, par = self.cfg.data, self.cfg.parallel
        minis = minibatches(
            groups,
            d.mini_batch_prompts,
            self.dp,
            self.dp_rank,
            d.micro_batch_size,
            max_tokens=d.max_tokens_per_micro_batch,
            pad_to=PAD_TO * (par.tp if par.sequence_parallel else 1),  # sequence parallel splits rows over TP
            max_seq_len=self.hf_cfg.max_position_embeddings,
            use_te=self.train_state.use_te,
            policy_version=self.step,  # the weights trained at: those of the steps done
        )
        metrics = update_policy(
            self.train_state, minis, self.cfg, self.hf_cfg.vocab_size, self.out, self.step + 1, rollout_metrics
        )
        metrics.update(layout_metrics(minis))
        if not minis and self.rank0:
            print(f"step {self.step + 1}: every group was filtered; no update this step", flush=True)
        return metrics

    def advance(self) -> None:
        """The step is trained: count it and take the prompt position and buffer the rollouts reached."""
        position, rows = self.pending
        self.state.advance(position)
        self.state.buffer, self.state.buffer_schema = rows, BUFFER_SCHEMA if rows else 0

    def sync(self, version: str) -> dict:
        """Collective: push the trainer's weights into the engine (taking back only the memory
        it released, after every rank freed its cached CUDA memory) and check them on the
        probe; a failed check raises ``SyncError`` and stops the run (the checkpoint is intact)."""
        r = self.cfg.rollout
        waited = 0.0
        if self.rank0:  # weights change only between batches (rollout.partial: the one in flight is cut)
            waited = self.rollouts.cut(self.cfg.data.mini_batch_prompts) if r.partial else self.rollouts.wait_idle()
        t0 = time.time()
        self.train_state.sync_params()  # the last update's all-gather otherwise waits for a forward
        module, bucket = self.train_state.module, r.bucket_mb * 2**20
        st = sync_into_engine(self.engine, module, self.hf_cfg, version, bucket, released=r.release_memory)
        self.engine_step = self.step
        m = {"time/sync_s": time.time() - t0, "sync/gb": st.bytes / 1e9, "sync/buckets": st.buckets}
        m["time/rollout_wait_s"] = broadcast_object(waited)  # generation the step could not hide
        if r.check_consistency:
            m["rollout/logprob_diff"] = probe_logprob_diff(
                self.engine, self.train_state.module, self.hf_cfg, self.probe,
                r.temperature, r.probe_tokens, self.cfg.seed, r.max_logprob_diff, r.probe_sequences,
            )  # fmt: skip
        return m

    def evaluate(self) -> dict:
        """avg@k / pass@k on the held-out prompts (rank 0 generates; every rank gets the numbers)."""
        res = None
        if self.rank0 and self.eval_prompts:
            ev, r = self.cfg.eval, self.cfg.rollout
            res = evaluate(
                self.engine,
                self.tokenizer,
                self.eval_prompts,
                self.cfg.reward,
                workers=r.reward_workers,
                k=ev.k,
                temperature=ev.temperature,
                top_p=ev.top_p,
                max_new_tokens=ev.max_new_tokens or r.max_response_len,
                seed=self.cfg.seed,
                stop_ids=self.collector.stop_ids,
                lenient_scores=ev.lenient,
                out_jsonl=self.out / "eval.jsonl",
                step=self.step,
            )
            print(f"eval @ step {self.step}: " + " ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
        return broadcast_object(res) or {}

    def evaluate_on_schedule(self) -> dict:
        """The evaluation of this step when one is due: every ``eval.interval`` steps, and after
        the last step (``eval.at_end``), so the final one lands in the last step's row."""
        ev, step = self.cfg.eval, self.step
        due = (ev.interval and step % ev.interval == 0) or (ev.at_end and step == self.cfg.train_steps)
        if not due:
            return {}
        self.last_eval = (step, self.evaluate())
        return self.last_eval[1]

    def log_step(self, metrics: dict, step_seconds: float) -> None:
        """The step's row; throughput counts the step's time without its evaluation."""
        gen_tokens = metrics.get("response/length_mean", 0.0) * metrics.get("rollout/samples", 0)
        work_seconds = max(step_seconds - metrics.get("time/eval_s", 0.0), 1e-9)
        metrics.update({"time/step_s": step_seconds, "perf/tokens_per_s": gen_tokens / work_seconds})
        self.log(metrics)

    def finish(self) -> None:
        """``final_eval.json``: the final evaluation (that of the last step, or a new one when a
        resumed run had no step left to run)."""
        if not self.cfg.eval.at_end:
            return
        final = self.last_eval[1] if self.last_eval[0] == self.step else self.evaluate()
        if self.rank0 and final:
            (self.out / "final_eval.json").write_text(json.dumps(dict(step=self.step, **final), indent=1))


def dry_run(cfg: RLConfig, report: DryRun) -> None:
    """``--dry-run``: everything an RL run checks before it starts, for the job's world size,
    without starting anything (no process group, model, engine or server); every problem goes
    into ``report``."""
    d = cfg.data
    report.check(cfg.log.check_imports)
    report.check(check_data_files, d.train + d.eval, d.generate)
    problem = writable_problem(Path(cfg.output_dir))
    if problem:
        report.problems.append(f"output_dir {cfg.output_dir}: {problem}")
    report.check(cfg.parallel.data_parallel_size, report.world_size)
    may_be_missing = cfg.model.create_tiny is not None or cfg.bootstrap is not None
    hf_cfg = report.check(starting_config, cfg.model, may_be_missing)
    if hf_cfg is not None:
        report.check(check_model_fits, cfg, hf_cfg)
    if all(Path(f).is_file() for f in d.train + d.eval):
        loaded = report.check(load_prompts, cfg)
        if loaded is not None:
            train_prompts, evals, stats = loaded
            print(f"prompts: {len(train_prompts)} for training {stats}, {len(evals)} for evaluation", flush=True)
            if any(p.ability == "code" for p in train_prompts + evals):
                if report.check(check_code_sandbox, cfg.reward.code, train_prompts + evals) is None:
                    print(f"sandbox: a known-good program passes, a known-bad one fails ({cfg.reward.code})")
    elif d.generate is not None:
        print(f"data: written by data.generate={d.generate} first; not read now", flush=True)
    if cfg.rollout.engine == "sglang":  # the trainer's GPUs per node: LOCAL_WORLD_SIZE if set, else up to 8
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or min(report.world_size, 8))
        report.check(check_sglang_launch, cfg, per_node)


def check_sglang_launch(cfg: RLConfig, trainer_gpus_per_node: int) -> None:
    """The SGLang servers can start as configured: an interpreter that has SGLang, engine GPUs
    that fit the trainer's, a rollout torch that reads the trainer's payloads (``rollout_env``)."""
    sg = cfg.sglang_config()
    if sg.launch and sg.python and shutil.which(sg.python) is None:
        raise ConfigError(f"rollout.sglang.python={sg.python} is not an executable")
    if sg.launch and not sg.python and importlib.util.find_spec("sglang") is None:
        raise ConfigError(
            "rollout.engine=sglang launches servers but sglang is not installed here (it lives in the rollout "
            "venv: pip install '.[rollout]' there, and set rollout.sglang.python to its interpreter)"
        )
    check_rollout_env(sg, trainer_gpus_per_node)
