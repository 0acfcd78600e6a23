"""The GPPO RL loop on CPU with gloo and the HF engine: the numbers that flow between phases,
dynamic sampling when everything is filtered, TP2 x PP2, exact resume after a kill mid-step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.jobs import ROOT, torchrun

DATA = ROOT / "examples" / "data"
CONFIG = "examples/tiny/rl_math.yaml"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """A tiny 4-layer model after a short SFT on the shipped data, so its samples vary in format."""
    from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

    root = tmp_path_factory.mktemp("rl")
    base = make_tiny_model(root / "base", TinyModelArgs(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128))
    torchrun(
        "megatron_klear.sft",
        "examples/tiny/sft.yaml",
        1,
        [f"output_dir={root / 'sft'}", f"model.hf={base}", "model.create_tiny=null",
         f"data.train=[{DATA / 'sft.jsonl'}]", f"data.cache_dir={root / 'cache'}", "data.generate=null",
         "train_steps=25", "log.tensorboard=false"],
    )  # fmt: skip
    return root / "sft" / "hf"


def rl_overrides(model: Path, out: Path, steps: int = 1) -> list[str]:
    return [
        f"output_dir={out}",
        f"model.hf={model}",
        "bootstrap=null",
        "data.generate=null",
        f"data.train=[{DATA / 'math_train.parquet'}]",
        f"data.eval=[{DATA / 'math_test.parquet'}]",
        f"train_steps={steps}",
        "data.prompts_per_step=4",
        "data.mini_batch_prompts=2",
        "data.micro_batch_size=2",
        "rollout.n_samples=4",
        "rollout.max_response_len=48",
        "rollout.dump=true",
        "reward.math.format_score=-1.0",  # format vs wrong answers: groups with signal
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.export_hf=false",
        "log.tensorboard=false",
    ]


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def dumped(out: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]


METRIC_NAMES = (
    "loss/clipfrac_high",
    "loss/clipfrac_low",
    "loss/dual_clipfrac",
    "loss/ppo_kl",
    "loss/entropy",
    "loss/sft_nll",
    "loss/grad_norm",
    "reward/mean",
    "reward/std",
    "reward/accuracy",
    "response/length_mean",
    "response/length_max",
    "response/clipped_frac",
    "time/generate_s",
    "time/old_logprobs_s",
    "time/train_s",
    "time/sync_s",
    "perf/tokens_per_s",
)


def check_step(out: Path, step: int = 1) -> None:
    m = metrics(out)[step]
    rows = dumped(out, step)
    used = [g for g in rows if g.get("kept") and g["source"] == "generated"] + [g for g in rows if g.get("used")]
    for g in rows:
        rewards = [s["reward"] for s in g["samples"]]
        if g["source"] == "generated":
            assert g["kept"] == (len(set(rewards)) > 1), "zero-advantage groups are exactly the filtered ones"
        assert abs(sum(s["advantage"] for s in g["samples"])) < 1e-6
    assert m["rollout/groups_kept"] == len(used) <= 4
    assert m["rollout/groups_filtered"] == sum(1 for g in rows if g["source"] == "generated" and not g["kept"])
    response_tokens = sum(len(s["response_ids"]) for g in used for s in g["samples"])
    # the loss saw exactly the kept groups' response tokens, and normalised by that count
    assert m["train/tokens"] == response_tokens == m["train/normaliser"]
    assert m["train/updates"] == -(-len(used) // 2)
    assert m["rollout/logprob_diff"] < 1e-4  # engine == trainer after the sync
    for k in METRIC_NAMES:
        assert k in m, k


def test_one_step_tp1(sft_model, tmp_path):
    out = tmp_path / "rl"
    torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, out))
    check_step(out)
    assert (out / "checkpoints" / "iter_0000001").is_dir()


def test_one_step_tp2_pp2(sft_model, tmp_path):
    out = tmp_path / "rl22"
    torchrun("megatron_klear.rl", CONFIG, 4, rl_overrides(sft_model, out) + ["parallel.tp=2", "parallel.pp=2"])
    check_step(out)


def test_every_group_filtered_still_runs(sft_model, tmp_path):
    out = tmp_path / "flat"
    o = rl_overrides(sft_model, out) + ["reward.math.format_score=0.0", "reward.math.correct_score=0.0",
                                        "reward.math.wrong_score=0.0", "data.max_gen_batches=2"]  # fmt: skip
    r = torchrun("megatron_klear.rl", CONFIG, 2, o)
    m = metrics(out)[1]
    assert m["rollout/groups_kept"] == 0 and m["rollout/gen_batches"] == 2 and m["train/updates"] == 0
    assert "every group was filtered" in r.stdout


def test_resume_after_kill_mid_step_is_exact(sft_model, tmp_path):
    # 2 mini-batch updates per step; the LR warm-up counts RL steps: 0, lr / 2, lr, lr
    common = ["checkpoint.save_interval=2", "data.max_gen_batches=1", "optim.warmup_steps=2", "optim.lr=1e-5",
              "optim.min_lr=1e-5"]  # fmt: skip
    ref = tmp_path / "ref"
    torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, ref, steps=4) + common)
    crashed = tmp_path / "crashed"
    r = torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, crashed, 4) + common, crash_at="rollout:3",
                 expect_ok=False)  # fmt: skip
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000002"
    r = torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, crashed, 4) + common)
    assert "resumed from" in r.stdout
    a, b = metrics(ref), metrics(crashed)
    assert [a[s]["train/lr"] for s in (1, 2, 3, 4)] == pytest.approx([0.0, 5e-6, 1e-5, 1e-5], abs=1e-12)
    assert [b[s]["train/lr"] for s in (3, 4)] == pytest.approx([1e-5, 1e-5], abs=1e-12)  # restored schedule
    for step in (3, 4):
        for k in ("reward/mean", "loss/pg", "loss/grad_norm", "response/length_mean", "rollout/groups_buffered"):
            assert a[step][k] == b[step][k], (step, k)


def test_long_prompts_skipped_and_nonfinite_update_never_synced(sft_model, tmp_path):
    out = tmp_path / "nan"
    o = rl_overrides(sft_model, out, steps=3) + [
        "rollout.max_prompt_len=60",
        "optim.lr=1e30",
        "optim.weight_decay=1e30",
    ]
    r = torchrun("megatron_klear.rl", CONFIG, 2, o, expect_ok=False)
    assert r.returncode != 0 and "non-finite" in r.stderr
    diag = json.loads((out / "nan_diagnostics.json").read_text())
    log = out / "metrics.jsonl"
    assert diag["step"] == 1 and (not log.exists() or not log.read_text().strip())  # stopped before sync and log
    rows = dumped(out, 1)
    assert all(len(s["prompt_ids"]) <= 60 for g in rows for s in g["samples"])
    assert diag["rollout"]["rollout/prompts_skipped_long"] > 0


def test_sglang_engine_failure_stops_with_checkpoint_intact_then_resumes(sft_model, tmp_path, monkeypatch):
    """CONTRACT TEST of the loop's SGLang path: rank 0 launches server and router doubles
    (tests/sglang_double.py, as processes) and syncs into them over a gloo weight-update group.
    The doubles generate no text, so every group is filtered; what is checked is what the loop
    sends (every HF tensor, once per sync, in bucket order) and that an engine that breaks for
    good stops the run after its retries with the last checkpoint intact."""
    import safetensors

    from tests.sglang_double import free_port_block, process_env

    logs = tmp_path / "doubles"
    logs.mkdir()
    for k, v in process_env(logs).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SGLANG_DOUBLE_VOCAB", "512")
    monkeypatch.setenv("SGLANG_DOUBLE_FAIL_FROM_VERSION", "step-2")  # broken from the sync after step 2
    base = free_port_block(3)
    out = tmp_path / "sgl"
    o = rl_overrides(sft_model, out, steps=3) + [
        "rollout.engine=sglang",
        "rollout.bucket_mb=1",
        "rollout.sglang.mode=distributed",
        "rollout.sglang.weight_sync_backend=gloo",
        f"rollout.sglang.port={base}",
        f"rollout.sglang.router_port={base + 1}",
        "rollout.sglang.nccl_master_address=127.0.0.1",
        f"rollout.sglang.nccl_master_port={base + 2}",
        "rollout.sglang.max_retries=1",
        "rollout.sglang.startup_timeout_s=120",
        "data.max_gen_batches=1",
        "checkpoint.save_interval=1",
    ]
    r = torchrun("megatron_klear.rl", CONFIG, 2, o, expect_ok=False)
    assert r.returncode != 0 and "rollout engine failed at step 3" in r.stdout + r.stderr
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000002"
    m = metrics(out)
    assert sorted(m) == [1, 2] and all(m[s]["rollout/groups_kept"] == 0 for s in (1, 2))

    server = [json.loads(line) for line in (logs / f"server_{base}.jsonl").read_text().splitlines()]
    with safetensors.safe_open(str(sft_model / "model.safetensors"), "pt") as f:
        hf_names = sorted(f.keys())
    syncs: dict[str, list[str]] = {}
    for row in server:
        if row["path"] == "/update_weights_from_distributed":
            syncs.setdefault(row["body"]["weight_version"], []).extend(row["body"]["names"])
    assert list(syncs) == ["step-0", "step-1", "step-2"]
    for names in syncs.values():
        assert sorted(names) == hf_names  # every tensor once, HF names
    assert [row["path"] for row in server].count("/init_weights_update_group") == 1
    starts = [row["body"]["launcher_env"] for row in server if row["method"] == "START"]
    assert starts == [[]]  # launched from a torchrun rank without its RANK / MASTER_* / TORCHELASTIC_*
    assert any(row["path"] == "/get_weights_by_name" for row in server)  # read back after each sync

    monkeypatch.delenv("SGLANG_DOUBLE_FAIL_FROM_VERSION")  # the engines are healthy again
    r = torchrun("megatron_klear.rl", CONFIG, 2, o)
    assert "resumed from" in r.stdout and sorted(metrics(out)) == [1, 2, 3]
