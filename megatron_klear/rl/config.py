"""Typed configuration of an RL run (YAML + dotted overrides, see ``megatron_klear.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_klear.errors import ConfigError
from megatron_klear.ops.loss import AGGS, ALGOS
from megatron_klear.training.run import CheckpointSection, LogSection, ModelSection, ParallelSection
from megatron_klear.training.state import OptimConfig


@dataclass
class RLDataSection:
    train: list[str] = field(default_factory=list)  # RL prompt files (.parquet / .jsonl)
    eval: list[str] = field(default_factory=list)  # held-out prompts for avg@k
    generate: Optional[str] = None  # write our synthetic data here first if it is missing
    prompts_per_step: int = 128  # prompts (groups) per training batch
    mini_batch_prompts: int = 16  # prompts per optimizer step (16 math, 32 code in the paper)
    max_gen_batches: int = 4  # generation batches per step before training on what there is
    min_code_tests: int = 16
    micro_batch_size: int = 1  # sequences per micro-batch
    seed: int = 1234


@dataclass
class RolloutSection:
    engine: str = "hf"  # "hf" (in-process transformers) or "sglang"
    hf_device: str = "cpu"
    hf_dtype: Optional[str] = None
    hf_max_batch: int = 64
    sglang: dict = field(default_factory=dict)  # SGLangConfig fields
    n_samples: int = 8  # G, responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_prompt_len: int = 4096  # longer prompts are skipped and counted
    max_response_len: int = 32768
    gen_chunks: int = 4  # split each generation batch so scoring overlaps generation
    bucket_mb: int = 512  # weight-sync bucket size
    check_consistency: bool = True  # engine vs trainer log-probs on a probe after every sync
    release_memory: bool = False  # colocated SGLang: free engine memory while training
    reward_workers: int = 4
    dump: bool = False  # write every generated group to output_dir/rollouts/step_NNNNNN.jsonl


@dataclass
class AlgoSection:
    loss: str = "gppo"  # "gppo", "clip" (clip-higher PPO/GRPO) or "cispo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_ratio_c: float = 10.0
    beta1: float = 1.0
    beta2: float = 1.0
    agg: str = "token-mean"
    sft_alpha: float = 0.1  # weight of the NLL on correct responses
    entropy_coef: float = 0.0
    adv_eps: float = 1e-6
    filter_zero_adv: bool = True  # drop groups whose rewards are all equal
    old_logprobs: str = "trainer"  # "trainer" (recompute) or "engine"
    tis_cap: Optional[float] = None  # truncated importance sampling engine -> trainer, e.g. 2.0


@dataclass
class RewardSection:
    math: dict = field(default_factory=dict)  # MathRewardConfig fields
    code: dict = field(default_factory=dict)  # CodeRewardConfig fields


@dataclass
class EvalSection:
    interval: int = 0  # every N steps (0: only at start / end when enabled)
    at_start: bool = True
    at_end: bool = True
    k: int = 4  # samples per prompt: avg@k and pass@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # default: rollout.max_response_len
    max_prompts: int = 0  # 0: all


@dataclass
class RLConfig:
    output_dir: str
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, min_lr=1e-6, decay_style="constant", warmup_steps=10)
    )
    data: RLDataSection = field(default_factory=RLDataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    reward: RewardSection = field(default_factory=RewardSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: "CheckpointSection" = field(default_factory=lambda: CheckpointSection(save_interval=10))
    log: LogSection = field(default_factory=LogSection)
    train_steps: int = 100
    seed: int = 1234
    bootstrap: Optional[str] = None  # SFT / RL config to run first when model.hf does not exist yet

    def validate(self) -> None:
        m, d, r, a = self.model, self.data, self.rollout, self.algo
        if (m.hf is None) == (m.load is None):
            raise ConfigError("set exactly one of model.hf (HF directory) and model.load (Megatron checkpoint)")
        if not d.train:
            raise ConfigError("data.train is empty")
        if d.prompts_per_step < 1 or d.mini_batch_prompts < 1 or d.max_gen_batches < 1:
            raise ConfigError("data.prompts_per_step, data.mini_batch_prompts and data.max_gen_batches must be >= 1")
        if d.prompts_per_step % d.mini_batch_prompts:
            raise ConfigError(
                f"data.prompts_per_step={d.prompts_per_step} is not a multiple of "
                f"data.mini_batch_prompts={d.mini_batch_prompts}"
            )
        if r.engine not in ("hf", "sglang"):
            raise ConfigError(f"rollout.engine must be 'hf' or 'sglang', got {r.engine!r}")
        if r.n_samples < 2:
            raise ConfigError("rollout.n_samples must be >= 2 (group-relative advantages need a group)")
        if r.max_prompt_len < 1 or r.max_response_len < 1:
            raise ConfigError("rollout.max_prompt_len and rollout.max_response_len must be >= 1")
        if a.loss not in ALGOS:
            raise ConfigError(f"algo.loss must be one of {ALGOS}, got {a.loss!r}")
        if a.agg not in AGGS:
            raise ConfigError(f"algo.agg must be one of {AGGS}, got {a.agg!r}")
        if a.old_logprobs not in ("trainer", "engine"):
            raise ConfigError(f"algo.old_logprobs must be 'trainer' or 'engine', got {a.old_logprobs!r}")
        if a.tis_cap is not None and not a.tis_cap > 0:
            raise ConfigError(f"algo.tis_cap must be > 0, got {a.tis_cap}")
        if a.sft_alpha < 0 or a.entropy_coef < 0:
            raise ConfigError("algo.sft_alpha and algo.entropy_coef must be >= 0")
        if self.train_steps < 1:
            raise ConfigError("train_steps must be >= 1")
        if self.eval.k < 1:
            raise ConfigError("eval.k must be >= 1")
        if self.parallel.context_parallel != 1:
            raise ConfigError("parallel.context_parallel > 1 is not supported yet")
        self.optim.validate()
