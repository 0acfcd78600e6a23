"""The GPPO RL loop on CPU with gloo and the HF engine: the numbers that flow between phases,
dynamic sampling when everything is filtered, TP2 x PP2, exact resume after a kill mid-step, and
rollouts that overlap training (rollout.overlap=1: one step off policy, resumed exactly).
The tiny config packs micro-batches into a token budget; the TP=1 run uses the padded fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    "pack/fill",
    "pack/micro_batches_per_rank",
    "pack/rank_tokens_max",
    "pack/rank_tokens_mean",
)


def check_step(out: Path, step: int = 1, max_diff: float = 1e-4, mini_batch: int = 2) -> None:
    m = metrics(out)[step]
    rows = dumped(out, step)
    # the step trains on the buffered groups first, then the kept generated ones, up to 4;
    # kept groups beyond that wait in the buffer
    buffered = [g for g in rows if g["source"] == "buffer"]
    used = (buffered + [g for g in rows if g["source"] == "generated" and g["kept"]])[:4]
    assert all(g["used"] for g in buffered[: len(used)])
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
    assert m["train/updates"] == -(-len(used) // mini_batch)
    assert m["rollout/logprob_diff"] < max_diff  # engine == trainer after the sync
    for k in METRIC_NAMES:
        assert k in m, k


def test_one_step_tp1(sft_model, tmp_path):
    out = tmp_path / "rl"
    evals = ["eval.at_start=true", "eval.at_end=true", "eval.k=2", "eval.max_prompts=4", "log.tensorboard=true"]
    padded = ["data.max_tokens_per_micro_batch=null"]  # micro_batch_size=2 padded sequences per micro-batch
    torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, out) + padded + evals)
    check_step(out)
    assert (out / "checkpoints" / "iter_0000001").is_dir()
    assert metrics(out)[1]["pack/fill"] < 1.0  # right padding
    # the step-0 and the final evaluation are rows of metrics.jsonl (and TensorBoard scalars),
    # overall, per ability and per data source; throughput leaves the evaluation's time out
    m = metrics(out)
    assert sorted(m) == [0, 1]
    sources = {json.loads(line)["data_source"] for line in (out / "eval.jsonl").read_text().splitlines()[:4]}
    for step in (0, 1):
        assert {"eval/avg@2", "eval/pass@2", "eval/math/avg@2", "time/eval_s"} <= set(m[step])
        assert all(f"eval/source/{s}/avg@2" in m[step] for s in sources)
    gen_tokens = m[1]["response/length_mean"] * m[1]["rollout/samples"]
    assert m[1]["perf/tokens_per_s"] == pytest.approx(gen_tokens / (m[1]["time/step_s"] - m[1]["time/eval_s"]))
    assert json.loads((out / "final_eval.json").read_text())["eval/avg@2"] == m[1]["eval/avg@2"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/avg@2")] == [0, 1]
    # every one of the k responses is kept
    row = json.loads((out / "eval.jsonl").read_text().splitlines()[0])
    assert len(row["responses"]) == 2 and all(isinstance(t, str) for t in row["responses"])


def test_one_step_tp2_pp2(sft_model, tmp_path):
    out = tmp_path / "rl22"
    small = ["data.max_tokens_per_micro_batch=200"]  # several packs per mini-batch cross the pipeline
    torchrun("megatron_klear.rl", CONFIG, 4, rl_overrides(sft_model, out) + ["parallel.tp=2", "parallel.pp=2"] + small)
    check_step(out)
    m = metrics(out)[1]
    assert m["pack/micro_batches_per_rank"] > 1 and m["pack/fill"] > 0.9


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
                 expect_ok=False, orphan_grace_s=10)  # fmt: skip
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000002"
    assert r.leftover == []  # kill -9 of rank 0 after a save: no helper process lives on
    r = torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, crashed, 4) + common)
    assert "resumed from" in r.stdout
    a, b = metrics(ref), metrics(crashed)
    assert [a[s]["train/lr"] for s in (1, 2, 3, 4)] == pytest.approx([0.0, 5e-6, 1e-5, 1e-5], abs=1e-12)
    assert [b[s]["train/lr"] for s in (3, 4)] == pytest.approx([1e-5, 1e-5], abs=1e-12)  # restored schedule
    for step in (3, 4):
        for k in ("reward/mean", "loss/pg", "loss/grad_norm", "response/length_mean", "rollout/groups_buffered"):
            assert a[step][k] == b[step][k], (step, k)


def test_overlap_trains_one_step_off_policy_and_resumes_exactly(sft_model, tmp_path):
    """rollout.overlap=1 with the HF engine generating in its own thread: the batch of step t + 1
    is sampled by the weights of step t - 1 while step t trains (rollout/policy_lag 1, the
    samples' weight versions), its ratio is taken against the log-probs of those weights, and a
    kill -9 mid-step (the next batch generating) resumes to the same losses as a run without it."""
    from transformers import AutoModelForCausalLM

    # one update per step: against the trainer's own recomputation the ratio would be exactly 1
    common = ["rollout.overlap=1", "checkpoint.save_interval=2", "data.max_gen_batches=1", "optim.warmup_steps=0",
              "optim.lr=1e-5", "optim.min_lr=1e-5", "data.mini_batch_prompts=4"]  # fmt: skip
    ref = tmp_path / "ref"
    torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, ref, steps=4) + common)
    m = metrics(ref)
    assert [m[s]["rollout/policy_lag"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    for step, version in ((1, 0), (2, 0), (3, 1), (4, 2)):
        assert {s["weight_version"] for g in dumped(ref, step) for s in g["samples"]} == {version}, step
        check_step(ref, step, mini_batch=4)
    # batch 2 was sampled by the starting model: its engine log-probs are transformers' of it
    model = AutoModelForCausalLM.from_pretrained(str(sft_model), dtype=torch.float64).eval()
    for g in dumped(ref, 2)[:2]:
        for s in g["samples"]:
            ids, p = s["prompt_ids"] + s["response_ids"], len(s["prompt_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0, p - 1 : -1].log_softmax(-1)
            want = logp.gather(-1, torch.tensor(s["response_ids"])[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(s["engine_logprobs"], dtype=torch.float64), want, atol=1e-4)
    # the ratio is against those (ppo_kl = mean(engine - trainer) of the newer policy); against the
    # trainer's recomputation, as on step 1 (on policy), it is exactly 1 (ppo_kl 0.0)
    assert abs(m[1]["loss/ppo_kl"]) < 1e-9 and m[1]["rollout/train_engine_diff"] < 1e-5
    for step in (2, 3, 4):
        assert 1e-9 < abs(m[step]["loss/ppo_kl"]) <= m[step]["rollout/train_engine_diff"] + 1e-7, step

    crashed = tmp_path / "crashed"
    r = torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, crashed, 4) + common, crash_at="rollout:3",
                 expect_ok=False, orphan_grace_s=10)  # fmt: skip
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000002"
    saved = json.loads((crashed / "checkpoints" / "iter_0000002" / "trainer_state.json").read_text())
    assert [(b["step"], b["weight_version"]) for b in saved["ahead"]] == [(3, 1)]  # generated ahead, kept
    r = torchrun("megatron_klear.rl", CONFIG, 2, rl_overrides(sft_model, crashed, 4) + common)
    assert "resumed from" in r.stdout
    b = metrics(crashed)
    for step in (3, 4):
        for k in ("reward/mean", "loss/pg", "loss/ppo_kl", "loss/grad_norm", "response/length_mean"):
            assert m[step][k] == b[step][k], (step, k)


def test_long_prompts_skipped_and_nonfinite_update_never_synced(sft_model, tmp_path):
    out = tmp_path / "nan"
    o = rl_overrides(sft_model, out, steps=3) + [
        "rollout.max_prompt_len=60",
        "optim.lr=1e30",
        "optim.weight_decay=1e30",
        "rollout.overlap=1",  # the run stops while the next batch generates in its thread
    ]
    r = torchrun("megatron_klear.rl", CONFIG, 2, o, expect_ok=False, orphan_grace_s=10)
    assert r.returncode != 0 and "non-finite" in r.stderr and r.leftover == []
    diag = json.loads((out / "nan_diagnostics.json").read_text())
    log = out / "metrics.jsonl"
    assert diag["step"] == 1 and (not log.exists() or not log.read_text().strip())  # stopped before sync and log
    rows = dumped(out, 1)
    assert all(len(s["prompt_ids"]) <= 60 for g in rows for s in g["samples"])
    assert diag["rollout"]["rollout/prompts_skipped_long"] > 0


@pytest.mark.real_sglang
@pytest.mark.timeout(1200)
def test_rl_with_real_sglang_servers_through_the_router(sft_model, tmp_path):
    """The loop end to end with rollout.engine=sglang: rank 0 launches a real SGLang server
    (CPU, float32) and a real router; colocated sync from both ranks (each serializes its own
    copy, sync.colocated) every step, with memory released around training (pause, release,
    free the trainer's cache, resume only what was released, continue); the probe check at the
    rollout temperature must stay under a threshold that fails the step."""
    from tests.sglang_real import cli_overrides, cpu_engine_config

    sg = cpu_engine_config(sft_model, tmp_path / "unused", mode="colocated")
    out = tmp_path / "sgl"
    o = (
        rl_overrides(sft_model, out, steps=2)
        + cli_overrides(sg)
        + [
            "rollout.engine=sglang",
            "rollout.release_memory=true",
            "rollout.max_logprob_diff=1e-3",
            "rollout.bucket_mb=1",
            "data.max_gen_batches=1",
        ]
    )
    r = torchrun("megatron_klear.rl", CONFIG, 2, o)
    m = metrics(out)
    assert sorted(m) == [1, 2]
    for step in (1, 2):
        check_step(out, step, max_diff=1e-3)
    logs = out / "sglang_logs"
    server_log = (logs / "server_0.log").read_text()
    assert server_log.count("/begin_weight_update") >= 3 and server_log.count("/end_weight_update") >= 3
    assert "/update_weights_from_tensor" in server_log and "/release_memory_occupation" in server_log
    assert "initial sync" in r.stdout
