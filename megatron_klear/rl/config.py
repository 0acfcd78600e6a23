"""Typed configuration of an RL run (YAML + dotted overrides, see ``megatron_klear.config``).

Every section checks itself when it loads, and ``RLConfig.validate`` checks across sections, so
a bad value stops the run before any process group, model or server starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

from megatron_klear.config import FilePath
from megatron_klear.data.synthetic import SyntheticDataConfig
from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import ConfigError
from megatron_klear.inference.sglang_servers import SGLangConfig
from megatron_klear.ops.loss import AGGS, ALGOS, check_policy_args
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.training.run import EVAL_TEMPERATURE, EVAL_TOP_P, CheckpointConfig, RunConfig, require_at_least
from megatron_klear.training.state import OptimConfig

ENGINES = ("hf", "sglang")
OLD_LOGPROBS = ("trainer", "engine")
SURPLUS = ("discard", "keep")
FILTER_METRICS = ("score", "acc")
ADV_STDS = ("population", "sample")


@dataclass
class RLDataConfig:
    """The ``data`` section: prompt files and how many prompts make a step and an update."""

    train: list[FilePath] = field(default_factory=list)  # RL prompt files (.parquet / .jsonl)
    eval: list[FilePath] = field(default_factory=list)  # held-out prompts for avg@k
    generate: Optional[FilePath] = None  # write our synthetic data here first if it is missing
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)  # what generate writes
    prompts_per_step: int = 128  # prompts (groups) per training batch
    mini_batch_prompts: int = 16  # prompts per optimizer step (16 math, 32 code in the paper)
    gen_batch_prompts: Optional[int] = None  # prompts per generation batch (default prompts_per_step)
    max_gen_batches: int = 4  # generation batches per step before training on what there is
    # Kept groups beyond prompts_per_step: "discard" (the public code: batch[:train_batch_size])
    # or "keep" for the next step. Kept groups were sampled by the policy before this step's
    # updates, so their ratio is taken against the engine's log-probs of that policy (or, with
    # algo.tis_cap, the trainer's recomputation with a truncated IS weight), never against a
    # recomputation under the newer weights alone.
    surplus: str = "discard"
    min_code_tests: int = 16  # drop code problems with fewer tests (the paper's curation); 0 keeps all
    # Token budget of one micro-batch: the mini-batch's sequences are packed (no padding
    # between them) into micro-batches of at most this many tokens, balanced over DP ranks.
    # Must hold the longest prompt + response. Transformer Engine's THD attention costs per
    # sequence, so a budget of a few longest sequences only saves micro-batches; torch-native
    # layers attend densely over the whole pack (cost ~ budget^2), so there a budget near the
    # longest sequence is fastest. Unset: micro_batch_size sequences per micro-batch,
    # right-padded to the mini-batch's longest sequence.
    max_tokens_per_micro_batch: Optional[int] = None
    micro_batch_size: int = 1  # sequences per micro-batch when max_tokens_per_micro_batch is unset
    seed: int = 1234  # prompt order and sampling seed
    max_bad_fraction: float = 0.01  # more malformed rows than this fraction of a file is an error

    def validate(self, where: str = "data") -> None:
        if not self.train:
            raise ConfigError(f"{where}.train is empty")
        require_at_least(
            self, where, 1, "prompts_per_step", "mini_batch_prompts", "max_gen_batches", "micro_batch_size"
        )
        require_at_least(self, where, 1, "gen_batch_prompts")
        require_at_least(self, where, 0, "min_code_tests")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"{where}.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.surplus not in SURPLUS:
            raise ConfigError(f"{where}.surplus must be one of {SURPLUS}, got {self.surplus!r}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ConfigError(f"{where}.max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(
                f"{where}.prompts_per_step={self.prompts_per_step} is not a multiple of "
                f"{where}.mini_batch_prompts={self.mini_batch_prompts}"
            )


@dataclass
class RolloutConfig:
    """The ``rollout`` section: the inference engine and how it samples."""

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "gen_chunks": "every prompt is submitted at once and each group scored as it completes; delete the key",
    }

    engine: str = "hf"  # "hf" (in-process transformers) or "sglang"
    hf_device: str = "cpu"  # engine=hf: device of the in-process model
    hf_dtype: Optional[str] = None  # engine=hf: dtype (default: the model's)
    hf_max_batch: int = 64  # engine=hf: sequences generated together
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # the SGLang servers (rollout.engine=sglang)
    n_samples: int = 8  # G, responses per prompt
    temperature: float = 1.0  # sampling temperature (> 0: a group needs different samples)
    top_p: float = 1.0  # nucleus sampling threshold (1: off)
    top_k: int = -1  # sample among the k most likely tokens (-1: all)
    max_prompt_len: int = 4096  # longer prompts are skipped and counted
    max_response_len: int = 32768  # generated tokens per response; longer ones are cut and counted as clipped
    bucket_mb: int = 512  # weight-sync bucket size
    check_consistency: bool = True  # engine vs trainer log-probs on a probe after every sync
    # ... at the rollout temperature over probe_sequences x probe_tokens sampled tokens; a
    # larger mean |diff|, twice in a row (one re-probe with other seeds), fails the sync (the
    # engine does not hold the trainer's weights)
    max_logprob_diff: float = 0.1
    probe_tokens: int = 16  # sampled tokens per sequence of the consistency probe
    probe_sequences: int = 4  # sequences sampled by the consistency probe
    release_memory: bool = False  # colocated SGLang: free engine memory while training
    # How many steps rollouts may run ahead of training (0: generate, then train). With 1, the
    # engine generates (and the reward workers score) the batch of step t + 1 on the weights it
    # holds while step t trains; those lag the trained policy by one update, and the loss takes
    # their ratio against the log-probs of the weights that sampled them. Needs an engine that
    # does not share the trainer's memory: rollout.sglang.mode=distributed, or the HF engine.
    overlap: int = 0
    # With rollout.overlap=1: at each step boundary the batch still generating is cut (once a
    # mini-batch of its groups completed) instead of awaited; its unfinished samples are
    # continued from their prefix by the next batch on the synced weights, each token keeping
    # the version that produced it (slime's partial rollout). The trainer does not wait for the
    # longest samples; where a cut falls depends on timing, so runs are not reproducible.
    partial: bool = False
    reward_workers: int = 4  # processes scoring responses
    dump: bool = False  # write every generated group to output_dir/rollouts/step_NNNNNN.jsonl

    def validate(self, where: str = "rollout") -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"{where}.engine must be 'hf' or 'sglang', got {self.engine!r}")
        if self.engine == "sglang":
            self.sglang.check_apart_from_trainer(f"{where}.sglang")
        if self.n_samples < 2:
            raise ConfigError(f"{where}.n_samples must be >= 2 (group-relative advantages need a group)")
        if self.max_prompt_len < 1 or self.max_response_len < 1:
            raise ConfigError(f"{where}.max_prompt_len and {where}.max_response_len must be >= 1")
        if not self.temperature > 0:
            # Greedy sampling makes every response of a group the same: all groups are filtered.
            raise ConfigError(f"{where}.temperature must be > 0 for RL (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p must lie in (0, 1], got {self.top_p}")
        if not self.max_logprob_diff > 0:
            raise ConfigError(f"{where}.max_logprob_diff must be > 0, got {self.max_logprob_diff}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"{where}.top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k}")
        require_at_least(
            self, where, 1, "hf_max_batch", "bucket_mb", "reward_workers", "probe_tokens", "probe_sequences"
        )
        require_at_least(self, where, 0, "overlap")


def check_overlap(r: RolloutConfig) -> None:
    """Rollouts can overlap training only on engines with their own memory: a colocated SGLang
    engine shares the trainer's GPUs (CUDA IPC sync, memory released around training)."""
    if r.partial and r.overlap != 1:
        raise ConfigError(
            f"rollout.partial=true cuts the batch generating ahead: it needs rollout.overlap=1, got {r.overlap}"
        )
    if r.overlap == 0:
        return
    if r.engine == "sglang" and r.sglang.mode == "colocated":
        raise ConfigError(
            f"rollout.overlap={r.overlap} needs engines on their own GPUs (rollout.sglang.mode=distributed): "
            "a colocated engine (rollout.sglang.mode=colocated) shares the trainer's GPUs and cannot generate "
            "while it trains; set rollout.overlap=0 or rollout.sglang.mode=distributed"
        )
    if r.release_memory:
        raise ConfigError(
            f"rollout.overlap={r.overlap} with rollout.release_memory=true: the engine's memory would be released "
            "while it generates the next batch; set one of them to 0 / false"
        )


@dataclass
class AlgoConfig:
    """The ``algo`` section: the policy loss and what it is computed against."""

    loss: str = "gppo"  # "gppo", "clip" (clip-higher PPO/GRPO) or "cispo"
    eps_low: float = 0.2  # lower clip range of the ratio (1 - eps_low)
    eps_high: float = 0.28  # upper clip range (1 + eps_high, clip-higher)
    clip_ratio_c: float = 10.0  # dual-clip bound for negative advantages
    beta1: float = 1.0  # GPPO: gradient scale of clipped tokens with A < 0 (ratio < 1 - eps_low)
    beta2: float = 1.0  # GPPO: gradient scale of clipped tokens with A > 0 (ratio > 1 + eps_high)
    agg: str = "token-mean"  # token-mean, seq-mean-token-mean or seq-mean-token-sum
    sft_alpha: float = 0.1  # weight of the NLL on correct responses
    entropy_coef: float = 0.0  # weight of the entropy bonus (0: none)
    adv_eps: float = 1e-6  # added to the group's reward std before dividing
    # Group advantage (r - mean) / (std + adv_eps): "population" std (paper Eq. 4) or "sample"
    # std (n - 1, the public code's torch.std)
    adv_std: str = "population"
    filter_zero_adv: bool = True  # dynamic sampling: drop groups without signal
    # What "without signal" means: "score" (every reward of the group equal) or "acc" (every
    # response equally correct: the public script's filter_groups.metric=acc, which also drops
    # all-wrong groups whose rewards differ only by format penalties)
    filter_metric: str = "score"
    old_logprobs: str = "trainer"  # "trainer" (recompute) or "engine"
    tis_cap: Optional[float] = None  # truncated importance sampling engine -> trainer, e.g. 2.0

    def validate(self, where: str = "algo") -> None:
        if self.loss not in ALGOS:
            raise ConfigError(f"{where}.loss must be one of {ALGOS}, got {self.loss!r}")
        if self.agg not in AGGS:
            raise ConfigError(f"{where}.agg must be one of {AGGS}, got {self.agg!r}")
        check_policy_args(
            algo=self.loss,
            agg=self.agg,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            clip_ratio_c=self.clip_ratio_c,
            beta1=self.beta1,
            beta2=self.beta2,
            error=ConfigError,
            where=f"{where}.",
        )
        if self.adv_std not in ADV_STDS:
            raise ConfigError(f"{where}.adv_std must be one of {ADV_STDS}, got {self.adv_std!r}")
        if self.filter_metric not in FILTER_METRICS:
            raise ConfigError(f"{where}.filter_metric must be one of {FILTER_METRICS}, got {self.filter_metric!r}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ConfigError(f"{where}.old_logprobs must be 'trainer' or 'engine', got {self.old_logprobs!r}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ConfigError(f"{where}.tis_cap must be > 0, got {self.tis_cap}")
        if self.sft_alpha < 0 or self.entropy_coef < 0:
            raise ConfigError(f"{where}.sft_alpha and {where}.entropy_coef must be >= 0")
        if not self.adv_eps > 0:
            raise ConfigError(f"{where}.adv_eps must be > 0, got {self.adv_eps}")


@dataclass
class RewardConfig:
    """The ``reward`` section: math and code reward settings."""

    math: MathRewardConfig = field(default_factory=MathRewardConfig)
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)


@dataclass
class EvalConfig:
    """The ``eval`` section: avg@k / pass@k on held-out prompts."""

    interval: int = 0  # every N steps (0: only at start / end when enabled)
    at_start: bool = True  # evaluate before the first step (step 0)
    at_end: bool = True  # evaluate after the last step
    k: int = 4  # samples per prompt: avg@k and pass@k
    temperature: float = EVAL_TEMPERATURE  # also the exported generation_config.json's
    top_p: float = EVAL_TOP_P  # also the exported generation_config.json's
    max_new_tokens: Optional[int] = None  # default: rollout.max_response_len
    max_prompts: int = 0  # 0: all
    lenient: bool = True  # also report eval/math/lenient_avg@k (the public judge_math.py scoring)

    def validate(self, where: str = "eval") -> None:
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1")
        if self.interval < 0 or self.max_prompts < 0:
            raise ConfigError(f"{where}.interval and {where}.max_prompts must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"{where}.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class RLParallelConfig(ParallelConfig):
    """The ``parallel`` section of an RL run. Its collective timeout is hours, not minutes:
    while rank 0 evaluates (avg@64 over the held-out prompts at up to 32K tokens per sample, on
    the engine), every other trainer rank waits for it in a collective."""

    timeout_minutes: int = 240


def _rl_optim() -> OptimConfig:
    """The recipe's RL optimizer: constant LR 1e-6 after 10 warm-up RL steps, Adam betas
    (0.9, 0.999) as the public RL run used (verl's AdamW default). A config's own ``optim``
    section starts from these values too (``config.from_dict``); the examples state them anyway."""
    return OptimConfig(lr=1e-6, min_lr=1e-6, decay_style="constant", warmup_steps=10, beta1=0.9, beta2=0.999)


@dataclass
class RLConfig(RunConfig):
    """An RL run: the YAML file's top level (every section typed and checked at load)."""

    parallel: RLParallelConfig = field(default_factory=RLParallelConfig)
    optim: OptimConfig = field(default_factory=_rl_optim)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(save_interval=10))
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train_steps: int = 100  # RL steps (each: rollouts of data.prompts_per_step prompts, then updates)
    bootstrap: Optional[FilePath] = None  # SFT / RL config to run first when model.hf does not exist yet

    def validate(self) -> None:
        """Checks across sections (each section checked itself when it loaded)."""
        if self.train_steps < 1:
            raise ConfigError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.parallel.context_parallel != 1:
            raise ConfigError("parallel.context_parallel > 1 is not supported in RL yet")
        if self.rollout.engine == "sglang" and self.rollout.sglang.mode == "colocated" and self.parallel.pp != 1:
            raise ConfigError(
                "rollout.sglang.mode=colocated needs parallel.pp=1 (each GPU sends its own copy of the "
                "weights); use rollout.sglang.mode=distributed with pipeline parallelism"
            )
        check_overlap(self.rollout)
        budget, r = self.data.max_tokens_per_micro_batch, self.rollout
        longest = r.max_prompt_len + r.max_response_len
        if budget is not None and budget < longest:
            raise ConfigError(
                f"data.max_tokens_per_micro_batch={budget} is smaller than the longest sequence, "
                f"rollout.max_prompt_len + rollout.max_response_len = {longest}"
            )
        if self.model.fp8 is not None:
            raise ConfigError(
                f"model.fp8={self.model.fp8!r} is not supported in RL: the old-log-prob and probe forwards would "
                "score in FP8 against a bf16 inference engine (the ratio and the consistency check would measure "
                "FP8 error), and FP8 GEMMs under sequence parallel need every sequence length / TP to be a multiple "
                "of 8 while RL pads to 8; set model.fp8=null (FP8 is for SFT)"
            )

    def sglang_config(self, **fields: Any) -> SGLangConfig:
        """``rollout.sglang`` with the run's model and log directory filled in (and ``fields``)."""
        sg = self.rollout.sglang
        values = dict(
            model_path=sg.model_path or self.model.tokenizer_dir or "",
            log_dir=sg.log_dir or str(Path(self.output_dir) / "sglang_logs"),
        )
        sg = replace(sg, **{**values, **fields})
        sg.validate()
        sg.check_launchable()
        return sg
