"""SFT trainer end to end on CPU with gloo: learning, parallel equivalence, micro-batch
invariance, exact resume after a crash (mid-training and mid-save) with no process left behind,
falling back past a damaged checkpoint, one run per output directory, bad input."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from megatron_klear.checkpoint.hf_io import file_mode
from megatron_klear.config import load_config
from megatron_klear.errors import ConfigError
from megatron_klear.sft.config import SFTConfig
from megatron_klear.training.rundir import RunLock
from tests.jobs import torchrun

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "sft.jsonl"


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """A 4-layer tiny model (so PP=2 has 2 layers a stage), float32 for exact comparisons."""
    from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("m") / "tiny4",
        TinyModelArgs(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128),
    )


def base_overrides(model: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"model.hf={model}",
        f"data.train=[{DATA}]",
        f"data.cache_dir={cache}",
        "data.seq_len=128",
        "data.global_batch_tokens=512",
        "data.micro_batch_size=1",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "optim.warmup_steps=2",
        "optim.weight_decay=0.0",
        "log.tensorboard=false",
        "checkpoint.export_hf=false",
        "checkpoint.keep_last=5",
    ]


def run_sft(nproc: int, overrides: list[str], crash_at: str | None = None, expect_ok: bool = True, **kw):
    return torchrun("megatron_klear.sft", "examples/tiny/sft.yaml", nproc, overrides, crash_at, expect_ok, **kw)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    steps = [r["step"] for r in rows(out)]
    assert len(steps) == len(set(steps)), f"one row per step, also after a resume: {steps}"
    return {r["step"]: r["loss"] for r in rows(out) if "loss" in r}


def test_loss_decreases_and_everything_is_written(tiny4, tmp_path):
    out = tmp_path / "run"
    r = run_sft(
        2,
        base_overrides(tiny4, out, tmp_path / "c")
        + ["train_steps=16", "checkpoint.save_interval=8", "checkpoint.export_hf=true", "log.tensorboard=true"]
        + [f"data.valid=[{DATA}]", "log.eval_interval=8", "log.eval_batches=1"],
    )
    ls = losses(out)
    assert sorted(ls) == list(range(1, 17))
    assert sum(ls[s] for s in range(13, 17)) / 4 < 0.8 * sum(ls[s] for s in range(1, 5)) / 4
    row = rows(out)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in row
    # validation before the first step and after the last, in metrics.jsonl and TensorBoard
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [0, 8, 16]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("val_loss")] == [0, 8, 16] and len(tb.Scalars("loss")) == 16
    # console lines carry time and rank; rank 1 says what it waits for while rank 0 builds the cache
    assert "[rank 1] waiting for rank 0: token cache of" in r.stdout
    assert "[rank 0] SFT: " in r.stdout
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000016"
    assert (out / "hf" / "model.safetensors").is_file() and list((out / "tensorboard").iterdir())
    # a model to serve: readable by others, sampling like the evaluation, stopping at <|im_end|>
    assert (out / "hf" / "model.safetensors").stat().st_mode & 0o777 == file_mode() == 0o644
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    AutoModelForCausalLM.from_pretrained(out / "hf")
    gen = GenerationConfig.from_pretrained(out / "hf")
    im_end = AutoTokenizer.from_pretrained(out / "hf").convert_tokens_to_ids("<|im_end|>")
    assert gen.do_sample and (gen.temperature, gen.top_p) == (0.6, 0.95) and im_end in gen.eos_token_id


def test_tp2_pp2_matches_tp1(tiny4, tmp_path):
    a, b = tmp_path / "tp1", tmp_path / "tp2pp2"
    common = ["train_steps=3", "checkpoint.save_interval=100"]
    run_sft(1, base_overrides(tiny4, a, tmp_path / "c") + common)
    run_sft(4, base_overrides(tiny4, b, tmp_path / "c") + common + ["parallel.tp=2", "parallel.pp=2"])
    la, lb = losses(a), losses(b)
    for s in (1, 2, 3):
        assert lb[s] == pytest.approx(la[s], rel=1e-4), (s, la, lb)
    # the whole gradient counts at TP=2 (a split weight's every part), as at TP=1
    assert rows(b)[0]["grad_norm"] == pytest.approx(rows(a)[0]["grad_norm"], rel=1e-5)


def test_gradient_does_not_depend_on_micro_batches(tiny4, tmp_path):
    a, b = tmp_path / "mbs4", tmp_path / "mbs1"
    common = ["train_steps=2", "checkpoint.save_interval=100"]
    run_sft(1, base_overrides(tiny4, a, tmp_path / "c") + common + ["data.micro_batch_size=4"])
    run_sft(1, base_overrides(tiny4, b, tmp_path / "c") + common + ["data.micro_batch_size=1"])
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert rb[0]["grad_norm"] == pytest.approx(ra[0]["grad_norm"], rel=1e-5)
    assert rb[1]["loss"] == pytest.approx(ra[1]["loss"], rel=1e-5)  # after one identical update


def test_crash_mid_training_and_mid_save_resume_exactly(tiny4, tmp_path):
    common = ["train_steps=12", "checkpoint.save_interval=4"]
    ref = tmp_path / "ref"
    run_sft(2, base_overrides(tiny4, ref, tmp_path / "c") + common)
    expected = losses(ref)

    crashed = tmp_path / "crashed"
    r = run_sft(2, base_overrides(tiny4, crashed, tmp_path / "c") + common, crash_at="step:6", expect_ok=False)
    assert r.returncode != 0 and (crashed / "checkpoints" / "latest").read_text() == "iter_0000004"
    # kill -9 of rank 0 in the middle of a save: no helper of the run (checkpoint writers, their
    # results-queue manager) outlives it by more than 10 s
    r = run_sft(
        2, base_overrides(tiny4, crashed, tmp_path / "c") + common, "save:8", expect_ok=False, orphan_grace_s=10
    )
    assert r.returncode != 0 and r.leftover == []
    assert "metrics.jsonl: dropped 2 rows of steps after 4" in r.stdout  # steps 5 and 6 are re-run
    assert (crashed / "checkpoints" / ".iter_0000008.tmp").is_dir()  # the half-written save
    assert (crashed / "checkpoints" / "latest").read_text() == "iter_0000004"
    r = run_sft(2, base_overrides(tiny4, crashed, tmp_path / "c") + common)
    assert "resumed from" in r.stdout and "iter_0000004" in r.stdout
    assert "metrics.jsonl: dropped 4 rows of steps after 4" in r.stdout  # 5 to 8 of the crashed run
    got = losses(crashed)  # one row per step
    assert [got[s] for s in range(5, 13)] == [expected[s] for s in range(5, 13)]  # bit-exact on CPU
    assert not (crashed / "checkpoints" / ".iter_0000008.tmp").exists()

    # A different seed or learning rate does not "resume" someone else's run.
    r = run_sft(2, base_overrides(tiny4, crashed, tmp_path / "c") + common + ["seed=99"], expect_ok=False)
    assert r.returncode != 0 and "cannot resume" in r.stderr and "seed: 1234 -> 99" in r.stderr
    # The newest checkpoint damaged after it was written: resume falls back to the one before it,
    # says so, and reproduces the steps after it exactly.
    distcp = crashed / "checkpoints" / "iter_0000012" / "model" / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[:1000])
    r = run_sft(2, base_overrides(tiny4, crashed, tmp_path / "c") + common)
    assert f"skipping iter_0000012: {distcp} is truncated: 1000 of" in r.stdout
    assert "resumed from" in r.stdout and "iter_0000008 at step 8" in r.stdout
    got = losses(crashed)
    assert sorted(got) == list(range(1, 13)) and [got[s] for s in range(9, 13)] == [expected[s] for s in range(9, 13)]


def test_one_live_run_per_output_dir(tiny4, tmp_path):
    """A second run on a live run's output_dir stops before it builds anything, naming the holder;
    the lock of a run that died is taken over."""
    out = tmp_path / "busy"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()  # this test process is the live holder
    r = run_sft(2, base_overrides(tiny4, out, tmp_path / "c") + ["train_steps=1"], expect_ok=False)
    holder = f"PID {os.getpid()} on host {socket.gethostname()}"
    assert r.returncode != 0 and f"output_dir {out} is in use by another live run: {holder}" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing else was written
    lock.fd, fd = None, lock.fd
    os.close(fd)  # the holder "dies": its flock is gone, its name is still in the file
    r = run_sft(1, base_overrides(tiny4, out, tmp_path / "c") + ["train_steps=1"])
    assert f"took over the lock of a run that is gone: {holder}" in r.stdout
    assert (out / "run.lock").read_text() == ""  # released at the end


def test_nan_stops_without_a_poisoned_checkpoint(tiny4, tmp_path):
    out = tmp_path / "nan"
    r = run_sft(
        1,
        base_overrides(tiny4, out, tmp_path / "c")
        + [
            "train_steps=30",
            "checkpoint.save_interval=1",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.clip_grad=0.0",
        ],
        expect_ok=False,
    )
    assert r.returncode != 0 and "non-finite" in r.stderr
    diag = json.loads((out / "nan_diagnostics.json").read_text())
    latest = (out / "checkpoints" / "latest").read_text() if (out / "checkpoints" / "latest").exists() else ""
    assert latest == "" or int(latest.split("_")[1]) < diag["step"]


def test_bad_paths_and_shapes_fail_before_training(tiny4, tmp_path):
    r = run_sft(
        1,
        base_overrides(tiny4, tmp_path / "o1", tmp_path / "c")
        + ["train_steps=2", f"data.train=[{tmp_path}/none.jsonl]"],
        expect_ok=False,
    )
    assert "none.jsonl: data file does not exist" in r.stderr
    r = run_sft(
        1,
        base_overrides(tiny4, tmp_path / "o2", tmp_path / "c")
        + ["train_steps=2", "data.seq_len=8192", "data.global_batch_tokens=8192"],
        expect_ok=False,
    )
    assert "exceeds the model's max_position_embeddings=4096" in r.stderr
    r = run_sft(
        1,
        base_overrides(tiny4, tmp_path / "o3", tmp_path / "c")
        + ["train_steps=2", f"model.hf={tmp_path}/nomodel", "model.create_tiny=null"],
        expect_ok=False,
    )
    assert "no config.json" in r.stderr
    # a checkpoint from a different model shape
    out = tmp_path / "o4"
    run_sft(1, base_overrides(tiny4, out, tmp_path / "c") + ["train_steps=1", "checkpoint.save_interval=1"])
    from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

    wide = make_tiny_model(
        tmp_path / "wide", TinyModelArgs(layers=4, hidden=96, heads=4, kv_heads=2, head_dim=16, ffn=128)
    )
    allow = ["checkpoint.allow_config_change=true"]  # past the config check, to the tensors themselves
    r = run_sft(1, base_overrides(wide, out, tmp_path / "c2") + ["train_steps=2"] + allow, expect_ok=False)
    assert "cannot load into this model" in r.stderr and "64" in r.stderr and "96" in r.stderr


def test_context_parallel_config_is_checked(tiny4, tmp_path):
    cfgfile = ROOT / "examples/tiny/sft.yaml"
    with pytest.raises(ConfigError, match="data.seq_len=102 must be a multiple of 2 x parallel.context_parallel = 4"):
        load_config(
            SFTConfig, cfgfile, ["parallel.context_parallel=2", "data.seq_len=102", "data.global_batch_tokens=408"]
        )
    with pytest.raises(
        ConfigError, match="data.seq_len / parallel.context_parallel = 66 must be a multiple of parallel.tp=4"
    ):
        load_config(
            SFTConfig,
            cfgfile,
            [
                "parallel.context_parallel=2",
                "parallel.tp=4",
                "parallel.sequence_parallel=true",
                "data.seq_len=132",
                "data.global_batch_tokens=528",
            ],
        )
    # on our CPU machines there is no Transformer Engine: asking for CP fails before training, naming the field
    r = run_sft(
        2,
        base_overrides(tiny4, tmp_path / "o", tmp_path / "c") + ["train_steps=1", "parallel.context_parallel=2"],
        expect_ok=False,
    )
    assert "parallel.context_parallel=2 needs Transformer Engine attention" in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
