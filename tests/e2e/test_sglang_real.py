"""The SGLang engine against a REAL SGLang 0.5.23 server and sglang-router 0.3.2 on CPU.

One module-scoped engine launches two real servers (float32, SGLang's CPU engine) and a real
router, and the tests run in file order on it: generation against transformers' log-probs,
both sync modes inside /begin_weight_update ... /end_weight_update, memory release and resume,
aborted samples, router registration, and the fault cases (SIGKILL a server mid-generation and
mid-sync, a server failing early in a broadcast, SIGKILL the router), each followed by restart,
re-registration and resync. Every wait is bounded and every process is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from megatron_klear.errors import EngineError, EngineWeightError, StaleEngineError
from megatron_klear.inference import http
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import SamplingParams
from megatron_klear.inference.sglang import MEMORY_TAGS, SGLangEngine
from megatron_klear.inference.sglang_servers import SGLangConfig
from tests.sglang_real import cpu_engine_config

pytestmark = [pytest.mark.real_sglang, pytest.mark.timeout(900)]

PROMPTS = [[5, 17, 33, 2, 9], [44, 3, 8], [7, 7, 100, 200, 31, 12]]


@pytest.fixture(scope="module")
def model_dir(hf_models):
    return hf_models["gqa4_untied"]


@pytest.fixture(scope="module")
def ref(model_dir):
    """transformers' float32 copy of the model: the reference the server is compared with."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eng(model_dir, tmp_path_factory):
    engine = SGLangEngine(cpu_engine_config(model_dir, tmp_path_factory.mktemp("sglang_logs"), replicas=2))
    yield engine
    engine.shutdown()
    assert all(s.proc.poll() is not None for s in engine.servers) and engine.pool.router_proc.poll() is not None


def ref_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].double()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(output)[:, None]).squeeze(-1)


def weights(model, scale: float) -> list[tuple[str, torch.Tensor]]:
    """The model's HF weights with the output layer scaled (a different distribution)."""
    return [(n, p.detach().clone() * (scale if n == "lm_head.weight" else 1.0)) for n, p in model.named_parameters()]


def load(model, named) -> None:
    with torch.no_grad():
        for n, t in named:
            dict(model.named_parameters())[n].copy_(t)


def check_against(ref_model, eng: SGLangEngine, temperature: float = 0.8, atol: float = 2e-3):
    params = SamplingParams(temperature=temperature, max_new_tokens=6, n=3, seed=11, ignore_eos=True)
    outs = eng.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, outs):
        assert len(group) == 3 and all(c.finish_reason == "length" and len(c.output_ids) == 6 for c in group)
        assert len({tuple(c.output_ids) for c in group}) > 1  # every sample its own seed
        for c in group:
            theirs = torch.tensor(c.logprobs, dtype=torch.float64)
            assert torch.allclose(theirs, ref_logprobs(ref_model, prompt, c.output_ids, temperature), atol=atol)
    return outs


def generate_in_thread(eng: SGLangEngine, prompts, params):
    box: dict = {}

    def run():
        try:
            box["out"] = eng.generate(prompts, params)
        except Exception as e:  # handed to the test
            box["error"] = e

    th = threading.Thread(target=run)
    th.start()
    return th, box


def kill(proc) -> int:
    pid = proc.pid
    os.killpg(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return pid


def await_decoding(servers, since: dict, timeout_s: float = 120.0):
    """The first of ``servers`` to log a decode batch past its log offset in ``since``: it is
    generating. SGLang logs one every 40 decode steps (its decode_log_interval), so a LONG
    sample still has most of its tokens to go; a fixed sleep races a fast machine, where all
    samples can finish before the fault is injected. Which server is busy is the router's
    choice (cache-aware: it may send every sample to one), so a test asks rather than assumes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for s in servers:
            with open(s.log, "rb") as f:
                f.seek(since[s.url])
                if b"Decode batch" in f.read():
                    return s
        time.sleep(0.05)
    raise AssertionError(f"no decode batch within {timeout_s:.0f} s in {[str(s.log) for s in servers]}")


def log_offsets(eng: SGLangEngine) -> dict:
    return {s.url: os.path.getsize(s.log) for s in eng.servers}


LONG = SamplingParams(temperature=1.0, max_new_tokens=300, n=2, seed=3, ignore_eos=True)


def test_generation_log_probs_are_transformers_at_the_temperature(eng, ref):
    assert [s.registered and not s.stale for s in eng.servers] == [True, True]
    check_against(ref, eng, temperature=0.8)
    check_against(ref, eng, temperature=1.0)


def test_input_log_probs_ignore_the_temperature_so_score_takes_only_one(eng, ref):
    seq = PROMPTS[2]
    [got] = eng.score([seq])
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref_logprobs(ref, seq[:1], seq[1:], 1.0), atol=2e-3)
    raw = [
        http.call(eng.router_url + "/generate", {**api.score_request([seq]), "sampling_params": {"temperature": t}})
        for t in (1.0, 0.3)
    ]  # what SGLang does: the same input log-probs at any temperature
    lps = [[e[0] for e in r[0]["meta_info"]["input_token_logprobs"][1:]] for r in raw]
    assert lps[0] == lps[1]
    with pytest.raises(EngineError, match="temperature 1 only"):
        eng.score([seq], temperature=0.5)


def test_distributed_sync_runs_inside_begin_and_end(eng, ref):
    url = eng.servers[0].url
    bucket = weights(ref, 1.0)[:1]
    outside = api.update_from_distributed_request(bucket, "any", "v0")
    with pytest.raises(EngineError, match="must run between begin_weight_update"):  # SGLang >= 0.5.21
        http.call(url + "/update_weights_from_distributed", outside)
    new = weights(ref, 3.0)
    eng.update_weights([new[:5], new[5:]], "step-1")  # two buckets, one broadcast each
    assert eng.version == "step-1" and not eng.stale and all(s.in_group and not s.in_update for s in eng.servers)
    load(ref, new)
    outs = check_against(ref, eng)
    assert len({round(c.logprobs[0], 3) for g in outs for c in g}) > 1  # scaled logits: far from uniform


def test_colocated_sync_of_flattened_buckets(eng, ref, tmp_path):
    """A second engine on the same servers (launch=false, as under the Slurm launcher) syncs
    by update_weights_from_tensor: one byte-flattened bucket of mixed dtypes per request."""
    cfg = SGLangConfig(
        mode="colocated", device="cpu", launch=False, server_urls=[s.url for s in eng.servers],
        router_url=eng.router_url, log_dir=str(tmp_path), startup_timeout_s=60,
    )  # fmt: skip
    colo = SGLangEngine(cfg)
    new = [(n, t.bfloat16() if "mlp" in n else t) for n, t in weights(ref, 0.5)]
    colo.update_weights([new], "colo-1")
    load(ref, [(n, t.float()) for n, t in new])
    check_against(ref, colo)
    with pytest.raises(EngineError, match="sampled with weight version 'colo-1', expected 'step-1'"):
        eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))  # the first engine's weights are gone
    eng.update_weights([weights(ref, 1.0)], "step-2")  # back to the first engine, same weights
    check_against(ref, eng)


def test_release_and_resume_only_what_was_released(eng):
    eng.release_memory(["kv_cache"])  # pauses generation first
    assert all(s.paused and s.released == {"kv_cache"} for s in eng.servers)
    th, box = generate_in_thread(eng, PROMPTS[:2], SamplingParams(max_new_tokens=4))
    time.sleep(3)
    assert th.is_alive()  # held while paused
    eng.resume_memory(MEMORY_TAGS)  # weights and cuda_graph were never released: not resumed
    th.join(timeout=120)
    assert not th.is_alive() and "error" not in box and len(box["out"]) == 2
    assert all(s.alive() and not s.paused and not s.released for s in eng.servers)
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=2))


def test_aborted_samples_are_generated_again_and_counted(eng):
    before = eng.aborted_samples
    since = log_offsets(eng)
    th, box = generate_in_thread(eng, PROMPTS[:2], LONG)
    await_decoding(eng.servers, since)
    eng.release_memory(["kv_cache"])  # pause_generation(abort): in-flight samples come back "abort"
    time.sleep(2.0)
    eng.resume_memory(["kv_cache"])  # continue_generation: the resubmitted samples run
    th.join(timeout=300)
    assert not th.is_alive() and "error" not in box
    assert all(c.finish_reason == "length" and len(c.output_ids) == 300 for g in box["out"] for c in g)
    assert eng.aborted_samples > before


def test_router_lists_and_drops_workers_by_id(eng):
    listed = eng.pool.listed_workers()
    assert sorted(w["url"] for w in listed) == sorted(s.url for s in eng.servers) and all(w.get("id") for w in listed)
    s = eng.servers[1]
    eng.pool.unregister(s)
    assert eng.pool.router_worker_id(s.url) is None and not s.registered
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=2))  # served by the other one
    eng.pool.register(s)
    assert eng.pool.router_worker_id(s.url) is not None and s.registered


def test_sigkill_server_mid_generation_then_restart_reregister_resync(eng, ref):
    since = log_offsets(eng)
    th, box = generate_in_thread(eng, PROMPTS + PROMPTS, LONG)
    dead = await_decoding(eng.servers, since)  # kill a server with samples in flight
    old = kill(dead.proc)
    th.join(timeout=600)
    assert not th.is_alive() and "error" not in box, box.get("error")
    assert all(len(c.output_ids) == 300 for g in box["out"] for c in g)  # retried on the live server
    assert dead.proc.pid != old and dead.alive() and dead.stale and not dead.registered and not dead.in_group
    assert eng.pool.router_worker_id(dead.url) is None
    eng.update_weights([weights(ref, 1.0)], "step-3")  # a new weight group with the restarted server
    assert all(s.registered and s.in_group and not s.stale for s in eng.servers)
    check_against(ref, eng)


def test_sigkill_server_mid_sync_then_resync(eng, ref):
    eng.begin_update("step-4")
    kill(eng.servers[0].proc)
    t0 = time.time()
    with pytest.raises(EngineError):
        eng.update_bucket(weights(ref, 1.0))
    assert time.time() - t0 < 60 and eng.stale
    with pytest.raises(StaleEngineError):
        eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    eng.update_weights([weights(ref, 1.0)], "step-4b")  # restarts the dead server, new group
    assert all(s.alive() and s.registered and not s.stale for s in eng.servers)
    check_against(ref, eng)


def test_server_failing_early_aborts_the_broadcast(eng, ref, monkeypatch):
    eng.begin_update("step-5")
    rejecting = eng.servers[0]
    http.call(rejecting.url + "/end_weight_update", {})  # its session is gone: it answers 400 at once
    t0 = time.time()
    with pytest.raises(EngineWeightError, match="broadcast aborted"):
        eng.update_bucket(weights(ref, 1.0))
    assert time.time() - t0 < 60  # not the group timeout (120 s): no waiting on a missing receiver
    still_receiving = {s.url for s in eng.servers if s.receiving}
    assert rejecting.url in still_receiving  # its announcement failed: it may be inside the receive
    pids = {s.url: s.proc.pid for s in eng.servers}
    # The other server's receive may still finish on its own (the broadcast reached it before the
    # abort): what counts is who is still receiving when the next sync begins.
    blocked_at_begin: list = []
    blocked = eng.transport.blocked
    monkeypatch.setattr(eng.transport, "blocked", lambda: blocked_at_begin.append(blocked()) or blocked_at_begin[-1])
    eng.update_weights([weights(ref, 1.0)], "step-5b")  # a new group; only servers left receiving restart
    monkeypatch.undo()
    [at_begin] = blocked_at_begin
    restarted = {s.url for s in eng.servers if s.proc.pid != pids[s.url]}
    assert restarted == {eng.servers[i].url for i in at_begin} and rejecting.url in restarted
    assert restarted <= still_receiving
    assert all(s.registered and s.in_group and not s.stale for s in eng.servers)
    check_against(ref, eng)


def test_sync_broken_off_mid_broadcast_restarts_the_blocked_servers(eng, ref, monkeypatch):
    """The trainer fails after the servers announced their receive and before it broadcasts:
    they are blocked inside the receive, where no request reaches them, so the next sync
    restarts them instead of trying to destroy the group."""
    eng.begin_update("step-6")

    def trainer_fails(*args):
        raise RuntimeError("the trainer failed mid-sync")

    monkeypatch.setattr(eng.transport, "broadcast_watched", trainer_fails)
    with pytest.raises(RuntimeError, match="mid-sync"):
        eng.update_bucket(weights(ref, 1.0))
    monkeypatch.undo()
    time.sleep(1.0)
    assert all(s.receiving for s in eng.servers)
    pids = [s.proc.pid for s in eng.servers]
    eng.update_weights([weights(ref, 1.0)], "step-6b")
    assert all(s.proc.pid != old for s, old in zip(eng.servers, pids))
    assert all(s.registered and s.in_group and not s.stale for s in eng.servers)
    check_against(ref, eng)


def test_sigkill_router_mid_generation_restarts_and_reregisters(eng, ref):
    since = log_offsets(eng)
    th, box = generate_in_thread(eng, PROMPTS, LONG)
    await_decoding(eng.servers, since)
    old = kill(eng.pool.router_proc)
    th.join(timeout=600)
    assert not th.is_alive() and "error" not in box, box.get("error")
    assert eng.pool.router_proc.pid != old
    assert sorted(w["url"] for w in eng.pool.listed_workers()) == sorted(s.url for s in eng.servers)
    check_against(ref, eng)
