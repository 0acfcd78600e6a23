"""Typed configs: every section is the class the code uses, checked when the file loads.

A typo or a bad value inside any section (``rollout.sglang``, ``reward.math``,
``model.create_tiny``, ``algo``) fails at load, naming the dotted key, before any process group,
model or server starts.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_klear.config import from_dict, iter_keys, load_config, to_dict
from megatron_klear.distributed import ParallelConfig
from megatron_klear.errors import ConfigError, KlearError
from megatron_klear.evals.config import EvalToolConfig
from megatron_klear.inference.sglang_servers import SGLangConfig
from megatron_klear.models.tiny import TinyModelArgs
from megatron_klear.ops.loss import policy_loss
from megatron_klear.rewards.code import CodeRewardConfig
from megatron_klear.rewards.math import MathRewardConfig
from megatron_klear.rl.config import RLConfig
from megatron_klear.sft.config import SFTConfig
from megatron_klear.training.rundir import flatten
from tests.jobs import ROOT

RL = ROOT / "examples/tiny/rl_math.yaml"
SFT = ROOT / "examples/tiny/sft.yaml"


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "examples/*/*.yaml"))))
def test_every_example_config_loads(path):
    if Path(path).name.startswith("eval"):  # tools/eval.py's options (megatron_klear/evals/config.py)
        assert isinstance(load_config(EvalToolConfig, path).protocol().k, int)
        return
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
        ("rollout.overlap=-1", "rollout.overlap must be >= 0"),
        ("rollout.partial=true", "rollout.partial=true cuts the batch generating ahead: it needs rollout.overlap=1"),
    ],
)
def test_rl_section_errors_at_load_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(RLConfig, RL, [override])


def test_overlap_is_refused_at_load_for_engines_that_share_the_trainers_memory():
    """Rollouts may run ahead of training only on engines of their own (distributed SGLang, or
    the HF engine in a thread); a colocated engine, or one whose memory is released around
    training, is refused when the config loads, naming the keys."""
    sglang = ["rollout.engine=sglang", "rollout.overlap=1"]
    with pytest.raises(ConfigError, match=r"rollout.overlap=1 needs engines on their own GPUs.*rollout.sglang.mode="):
        load_config(RLConfig, RL, sglang + ["rollout.sglang.mode=colocated"])
    with pytest.raises(ConfigError, match="rollout.overlap=2 with rollout.release_memory=true"):
        load_config(RLConfig, RL, ["rollout.overlap=2", "rollout.release_memory=true"])
    apart = ["rollout.sglang.mode=distributed", "rollout.sglang.base_gpu_id=1"]
    assert load_config(RLConfig, RL, sglang + apart).rollout.overlap == 1
    assert load_config(RLConfig, RL, ["rollout.overlap=1"]).rollout.engine == "hf"
    assert load_config(RLConfig, RL, []).rollout.overlap == 0  # today's behaviour by default


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


# --- every count or interval is checked at load, naming the field -----------------------------


@pytest.mark.parametrize(
    "path, overrides, message",
    [
        (SFT, ["checkpoint.save_interval=0"], "checkpoint.save_interval must be >= 1, got 0"),
        (SFT, ["checkpoint.keep_last=-1"], "checkpoint.keep_last must be >= 1, got -1"),
        (SFT, ["log.interval=0"], "log.interval must be >= 1, got 0"),
        (SFT, ["log.eval_batches=0"], "log.eval_batches must be >= 1"),
        (SFT, ["log.eval_interval=-1"], "log.eval_interval must be >= 0"),
        (SFT, ["train_steps=0"], "train_steps must be >= 1, got 0"),
        (SFT, ["train_steps=-5"], "train_steps must be >= 1, got -5"),
        (SFT, ["train_steps=null", "epochs=0"], "epochs must be > 0, got 0.0"),
        (SFT, ["data.global_batch_tokens=0"], "data.global_batch_tokens=0 must be at least data.seq_len=256"),
        (SFT, ["data.workers=0"], "data.workers must be >= 1"),
        (SFT, ["data.max_bad_fraction=1.5"], r"data.max_bad_fraction must lie in \[0, 1\]"),
        (RL, ["checkpoint.save_interval=0"], "checkpoint.save_interval must be >= 1, got 0"),
        (RL, ["log.interval=0"], "log.interval must be >= 1, got 0"),
        (RL, ["train_steps=0"], "train_steps must be >= 1, got 0"),
        (RL, ["rollout.top_k=0"], r"rollout.top_k must be -1 \(whole vocabulary\) or >= 1"),
        (RL, ["eval.top_p=0"], r"eval.top_p must lie in \(0, 1\]"),
        (RL, ["data.min_code_tests=-1"], "data.min_code_tests must be >= 0"),
    ],
)
def test_counts_and_intervals_are_checked_at_load(path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig if path == RL else SFTConfig, path, overrides)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    """A config's own relative paths are relative to it, an override's to the working directory,
    so a config runs the same from any directory."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RLConfig, RL, ["data.eval=[here.parquet]", "model.hf=~/m"])
    assert cfg.output_dir == str(ROOT / "runs" / "tiny_rl_math")
    assert cfg.data.train == [str(ROOT / "runs" / "tiny_data" / "math_train.parquet")]
    assert cfg.bootstrap == str(ROOT / "examples" / "tiny" / "sft.yaml")
    assert cfg.data.eval == [str(tmp_path / "here.parquet")]
    assert cfg.model.hf == str(Path.home() / "m")
    sft = load_config(SFTConfig, cfg.bootstrap)
    assert sft.model.hf == str(ROOT / "runs" / "tiny_model") and sft.data.cache_dir == str(ROOT / "runs" / "cache")
    assert load_config(SFTConfig, SFT, ["output_dir=/abs/out"]).output_dir == "/abs/out"


@pytest.mark.parametrize("cls", [SFTConfig, RLConfig])
def test_every_key_is_listed_with_type_default_and_meaning(cls):
    rows = list(iter_keys(cls))
    keys = {k for k, *_ in rows}
    data = to_dict(load_config(cls, RL if cls is RLConfig else SFT))
    assert set(flatten(data)) <= keys  # every leaf of a loaded config is listed
    # the two sections whose owners document them in their own modules are not checked here
    owned_elsewhere = ("rollout.sglang.", "reward.")
    missing = [k for k, tp, _, meaning in rows if not meaning and not k.startswith(owned_elsewhere)]
    assert not missing, f"keys without a one-line meaning (a comment on the field's line): {missing}"
    by_key = {k: (tp, default) for k, tp, default, _ in rows}
    assert by_key["output_dir"] == ("path", dataclasses.MISSING)
    assert by_key["checkpoint.save_interval"][1] == (10 if cls is RLConfig else 500)  # RL's own default
    assert by_key["model.hf"][0] == "path | null" and by_key["data.train"][0] == "list[path]"


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},  # every warning that is not known shows
    )


def test_cli_bad_config_is_one_line_exit_2():
    """The issue's cases through the real entry points: a line naming the key, no traceback,
    and nothing started (the config is rejected before any process group)."""
    for module, cfg, override, message in [
        ("megatron_klear.sft", SFT, "checkpoint.save_interval=0", "checkpoint.save_interval must be >= 1"),
        ("megatron_klear.rl", RL, "algo.eps_low=1.5", "algo.eps_low must be < 1"),
        ("megatron_klear.sft", SFT, "log.wandb_project=demo", "log.wandb_project is set but wandb is not installed"),
    ]:
        if "wandb" in override and importlib.util.find_spec("wandb") is not None:
            continue
        r = cli(module, "--config", str(cfg), override)
        assert r.returncode == 2, r.stderr[-2000:]
        assert message in r.stderr and "Traceback" not in r.stderr
        assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_cli_list_keys_print_config_and_dry_run(tmp_path):
    r = cli("megatron_klear.rl", "--list-keys", cwd=tmp_path)
    assert r.returncode == 0
    assert re.search(r"^algo\.eps_low\s+float\s+0\.2\s+lower clip range", r.stdout, re.M)
    r = cli("megatron_klear.sft", "--config", str(SFT), "--print-config", "train_steps=7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train_steps"] == 7 and printed["optim"]["beta2"] == 0.95  # defaults included
    assert printed["output_dir"] == str(ROOT / "runs" / "tiny_sft")  # from any working directory
    assert load_config(SFTConfig, SFT, ["train_steps=7"]) == from_dict(SFTConfig, printed)

    data = ROOT / "examples" / "data" / "sft.jsonl"
    ok = ["--dry-run", f"data.train=[{data}]", "data.generate=null", f"output_dir={tmp_path / 'out'}"]
    r = cli("megatron_klear.sft", "--config", str(SFT), *ok, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sft.jsonl: first 76 rows read, 0 malformed" in r.stdout and "dry run: everything checked" in r.stdout
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] ", r.stdout, re.M)  # time and rank
    assert not (tmp_path / "out").exists()  # nothing was started or created
    r = cli("megatron_klear.sft", "--config", str(SFT), *ok, "output_dir=/proc/none/out", cwd=tmp_path)
    assert r.returncode == 2 and "output_dir /proc/none/out: /proc is not writable" in r.stderr
    r = cli("megatron_klear.sft", "--config", str(SFT), *ok, f"data.valid=[{tmp_path / 'no.jsonl'}]", cwd=tmp_path)
    assert r.returncode == 2 and "no.jsonl: data file does not exist" in r.stderr


def test_rl_entry_point_runs_the_bootstrap_stage_through_the_pipeline(tmp_path):
    """``python -m megatron_klear.rl`` is the pipeline's entry (rl/ never imports sft/): a stage
    file is SFT or RL by its sections, and with model.hf missing the dry run checks the
    bootstrap stage's config too; with the model there, bootstrap does nothing."""
    from megatron_klear import pipeline

    assert isinstance(pipeline.stage_config(str(SFT)), SFTConfig)
    assert isinstance(pipeline.stage_config(str(RL)), RLConfig)
    missing = tmp_path / "model"
    ok = ["--dry-run", f"model.hf={missing}", f"output_dir={tmp_path / 'out'}", f"data.generate={tmp_path / 'd'}"]
    r = cli("megatron_klear.rl", "--config", str(RL), *ok, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"bootstrap {SFT}: config loads (it runs first: model.hf is not there yet)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: out\ntrain_steps: 0\n")
    r = cli("megatron_klear.rl", "--config", str(RL), *ok, f"bootstrap={bad}", cwd=tmp_path)
    assert r.returncode == 2 and "train_steps must be >= 1" in r.stderr
    cfg = load_config(RLConfig, RL, [f"model.hf={missing}"])
    missing.mkdir()
    (missing / "config.json").write_text("{}")
    pipeline.bootstrap(cfg)  # the model is there: nothing runs
