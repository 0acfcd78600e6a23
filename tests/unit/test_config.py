"""Typed configs: every section is the class the code uses, checked when the file loads.

A typo or a bad value inside any section (``rollout.sglang``, ``reward.math``,
``model.create_tiny``, ``algo``) fails at load, naming the dotted key, before any process group,
model or server starts.
"""

from __future__ import annotations

import glob

import pytest
import yaml

from megatron_klear.config import load_config
from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import ConfigError, KlearError
from megatron_klear.inference.sglang import SGLangConfig
from megatron_klear.models.tiny import TinyModelArgs
from megatron_klear.ops.loss import policy_loss
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.rl.config import RLConfig
from megatron_klear.sft import SFTConfig
from tests.jobs import ROOT

RL = ROOT / "examples/tiny/rl_math.yaml"
SFT = ROOT / "examples/tiny/sft.yaml"


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "examples/*/*.yaml"))))
def test_every_example_config_loads(path):
    raw = yaml.safe_load(open(path))
    cls = RLConfig if ("rollout" in raw or "algo" in raw) else SFTConfig
    cfg = load_config(cls, path)
    assert isinstance(cfg.parallel, ParallelConfig)
    if cls is RLConfig:
        assert isinstance(cfg.rollout.sglang, SGLangConfig)
        assert isinstance(cfg.reward.math, MathRewardConfig) and isinstance(cfg.reward.code, CodeRewardConfig)
    if cfg.model.create_tiny is not None:
        assert isinstance(cfg.model.create_tiny, TinyModelArgs)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.sglang.modee=x", "unknown config key rollout.sglang.modee"),
        ("rollout.sglang.mode=ipc", "rollout.sglang.mode must be 'colocated' or 'distributed'"),
        ("rollout.sglang.replicas=0", "rollout.sglang.replicas and rollout.sglang.tp_size must be >= 1"),
        ("reward.math.wrong_scor=0", "unknown config key reward.math.wrong_scor"),
        ("reward.code.timeout_s=fast", "reward.code.timeout_s: expected a number"),
        ("model.create_tiny={layerz: 3}", "unknown config key model.create_tiny.layerz"),
        ("model.fp8=e5m2", "model.fp8 must be null or one of"),
        ("model.fp8=hybrid", "model.fp8='hybrid' is not supported in RL"),
        ("parallel.timeout_minutes=0", "parallel.timeout_minutes must be >= 1"),
        ("model.logprob_impl=cuda", "model.logprob_impl must be 'torch' or 'triton'"),
        ("algo.eps_low=1.5", "algo.eps_low must be < 1"),
        ("algo.eps_high=-0.1", "algo.eps_high must be >= 0"),
        ("algo.clip_ratio_c=1.0", "algo.clip_ratio_c must be > 1"),
        ("algo.loss=ppo", "algo.loss must be one of"),
        ("rollout.temperature=0", "rollout.temperature must be > 0 for RL"),
        ("parallel.tp=0", "parallel.tp must be >= 1"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel needs parallel.tp > 1"),
        ("data.mini_batch_prompts=0", "data.mini_batch_prompts must be >= 1"),
        ("eval.k=0", "eval.k must be >= 1"),
        ("data.synthetic.kind=text", "data.synthetic.kind must be one of"),
        ("data.synthetic.levels=[5]", "data.synthetic.levels must be a non-empty list of"),
        ("optim.beta1=1.5", "optim.beta1 must lie in"),
    ],
)
def test_rl_section_errors_at_load_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(RLConfig, RL, [override])


def test_rl_waits_hours_in_collectives_sft_minutes():
    """Rank 0 evaluates while the other RL ranks wait in a collective: RL's default is hours.
    A ``parallel`` section in the file keeps the run's own default for keys it leaves out."""
    rl = load_config(RLConfig, RL, ["parallel.tp=1"])
    assert rl.parallel.timeout_minutes == 240
    assert load_config(RLConfig, RL, ["parallel.timeout_minutes=600"]).parallel.timeout_minutes == 600
    assert load_config(SFTConfig, SFT, ["parallel.tp=1"]).parallel.timeout_minutes == 30


def test_sft_section_errors_at_load_name_the_key():
    with pytest.raises(ConfigError, match="data.overlong must be 'truncate' or 'drop'"):
        load_config(SFTConfig, SFT, ["data.overlong=cut"])
    with pytest.raises(ConfigError, match="model.recompute must be null, 'full' or 'selective'"):
        load_config(SFTConfig, SFT, ["model.recompute=some"])


def test_recompute_options_reach_megatron_and_misuse_is_named():
    """``model.recompute*`` become Megatron's TransformerConfig fields; misuse fails at load."""
    from megatron_klear.models.config import Qwen3Config
    from megatron_klear.models.qwen3 import transformer_config
    from megatron_klear.models.shapes import qwen3_config_dict

    hf = Qwen3Config.from_dict(qwen3_config_dict("tiny"))  # 2 layers
    sel = load_config(SFTConfig, SFT, ["model.recompute=selective", "model.recompute_modules=[mlp]"]).model
    tc = transformer_config(hf, 1, 1, sel)
    assert (tc.recompute_granularity, tc.recompute_modules) == ("selective", ["mlp"])
    full = load_config(
        SFTConfig, SFT, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"]
    ).model
    tc = transformer_config(hf, 1, 1, full)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    assert not tc.apply_rope_fusion and not tc.gradient_accumulation_fusion  # no TE, no apex, no GPU here
    with pytest.raises(ConfigError, match="recompute_num_layers=2 exceeds the 1 layers of a pipeline stage"):
        transformer_config(hf, 1, 2, full)
    for overrides, message in [
        (["model.recompute_modules=[mlp]"], "model.recompute_modules needs model.recompute=selective"),
        (["model.recompute=selective", "model.recompute_modules=[attn]"], "model.recompute_modules must be"),
        (["model.recompute_method=block"], "need model.recompute=full"),
        (["model.recompute=full", "model.recompute_method=block"], "model.recompute_method=block needs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(SFTConfig, SFT, overrides)


def test_loss_and_config_accept_the_same_gppo_bounds():
    """One check serves both: what the loss rejects, the config rejects, with the same words."""
    import torch

    x = torch.zeros(1, 2)
    for kwargs in ({"eps_low": 1.0}, {"clip_ratio_c": 0.5}, {"beta1": -1.0}):
        with pytest.raises(ValueError) as from_loss:
            policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), **kwargs)
        key, value = next(iter(kwargs.items()))
        with pytest.raises(ConfigError) as from_config:
            load_config(RLConfig, RL, [f"algo.{key}={value}"])
        assert str(from_config.value).endswith("algo." + str(from_loss.value))


def test_every_user_error_is_a_klear_error():
    from megatron_klear import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 8 and all(issubclass(c, KlearError) for c in classes)


def test_a_section_in_the_file_starts_from_the_runs_own_defaults(tmp_path):
    """RL's ``optim`` defaults differ from OptimConfig's: a partial ``optim:`` section keeps them."""
    cfg_file = tmp_path / "rl.yaml"
    cfg_file.write_text(
        f"output_dir: {tmp_path}\nmodel: {{hf: {tmp_path}}}\ndata: {{train: [x.parquet]}}\n"
        "optim: {lr: 2.0e-6}\ncheckpoint: {keep_last: 1}\n"
    )
    cfg = load_config(RLConfig, cfg_file)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.decay_style, cfg.optim.warmup_steps) == (
        2e-6,
        1e-6,
        "constant",
        10,
    )
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.999)
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.save_interval) == (1, 10)


def test_a_retired_key_says_what_to_do_instead():
    with pytest.raises(
        ConfigError, match="config key rollout.gen_chunks was removed: every prompt is submitted at once"
    ):
        load_config(RLConfig, RL, ["rollout.gen_chunks=4"])
