"""Rollout engines: the HF engine's sampling and weight updates, and the SGLang request contract.

The SGLang tests are CONTRACT TESTS: SGLang cannot run on CPU, so the local HTTP doubles of
tests/sglang_double.py record what our SGLangEngine sends and answer in SGLang 0.5.x's response
format. They check that every request has exactly the fields and JSON types of SGLang's request
structs (``srt/managers/io_struct.py``), and how the engine supervises servers and the router;
they say nothing about SGLang's behaviour.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
from dataclasses import dataclass

import pytest
import torch

from megatron_klear.errors import ConfigError, EngineError, EngineWeightError, StaleEngineError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import SamplingParams
from megatron_klear.inference.hf import HFEngine, filter_logits
from megatron_klear.inference.sglang import SGLangConfig, SGLangEngine, router_command, server_command
from tests.sglang_double import RouterDouble, ServerDouble, check_contract, free_port_block, process_env

# ----------------------------------------------------------------------------- HF engine


@pytest.fixture(scope="module")
def engine(hf_models):
    return HFEngine(str(hf_models["gqa4_untied"]))


def _prompts():
    return [[5, 17, 33, 2, 9], [44, 3], [7, 7, 7, 100, 200, 31, 12]]


def test_greedy_matches_transformers_generate(engine):
    p = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[])
    outs = engine.generate(_prompts(), p)
    for prompt, [c] in zip(_prompts(), outs):
        ref = engine.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert c.output_ids == ref[: len(c.output_ids)]
        assert c.finish_reason in ("stop", "length")


def test_sampled_logprobs_are_the_models_and_batching_is_invisible(engine):
    p = SamplingParams(temperature=0.7, max_new_tokens=8, n=3, seed=123)
    outs = engine.generate(_prompts(), p)
    assert [len(o) for o in outs] == [3, 3, 3]
    for prompt, group in zip(_prompts(), outs):
        for c in group:
            full = engine.score([prompt + c.output_ids], temperature=0.7)[0]
            assert torch.allclose(torch.tensor(full[len(prompt) - 1 :]), torch.tensor(c.logprobs), atol=1e-5)
    again = engine.generate(_prompts(), p)
    assert [[c.output_ids for c in g] for g in outs] == [[c.output_ids for c in g] for g in again]  # seeded


def test_stop_tokens_and_length(engine):
    p = SamplingParams(temperature=0.0, max_new_tokens=4)
    [[c]] = engine.generate([_prompts()[0]], p)
    first = c.output_ids[0]
    [[s]] = engine.generate([_prompts()[0]], SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=[first]))
    assert s.output_ids == [first] and s.finish_reason == "stop"
    if first not in c.output_ids[1:] and c.finish_reason == "length":
        assert len(c.output_ids) == 4


def test_stop_at_im_end_when_the_tokenizers_eos_differs(hf_models, tmp_path):
    """A base tokenizer's eos (<|endoftext|>) is not the chat turn's end (<|im_end|>): stop ids
    come from the tokenizer and generation_config.json, and both engines get all of them."""
    from transformers import AutoTokenizer

    from megatron_klear.data.chat import IM_END, decode_response, stop_token_ids

    src = hf_models["gqa4_untied"]
    tok = AutoTokenizer.from_pretrained(str(src), eos_token="<|endoftext|>")
    eos, im_end, im_start = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", IM_END, "<|im_start|>"))
    assert tok.eos_token_id == eos != im_end
    assert stop_token_ids(tok) == sorted([eos, im_end])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, im_start]}))
    assert stop_token_ids(tok, tmp_path) == sorted({eos, im_end, im_start})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id must be"):
        stop_token_ids(tok, tmp_path)
    assert decode_response(tok, tok.encode("so 3 + 4 = 7" + IM_END)) == "so 3 + 4 = 7"

    # HF engine whose model config names <|endoftext|> as eos, with the greedy first token made
    # <|im_end|> (its lm_head row swapped with the greedy choice's): it stops there only when
    # asked to stop at <|im_end|>
    eng = HFEngine(str(src))
    eng.model.config.eos_token_id = eos
    eng.eos_ids = {eos}
    prompt = [_prompts()[0]]
    [[c]] = eng.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4))
    first = c.output_ids[0]
    with torch.no_grad():
        w = eng.model.lm_head.weight
        w[[first, im_end]] = w[[im_end, first]]
    [[only_eos]] = eng.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=[eos]))
    assert only_eos.output_ids[0] == im_end and len(only_eos.output_ids) > 1
    [[c]] = eng.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=stop_token_ids(tok)))
    assert c.output_ids == [im_end] and c.finish_reason == "stop"
    # the SGLang request carries the same ids
    body = api.sampling_params_json(SamplingParams(stop_token_ids=stop_token_ids(tok)))
    assert body["stop_token_ids"] == sorted([eos, im_end])
    check_contract("/generate", {"input_ids": [[1]], "sampling_params": body, "return_logprob": True})


def test_top_k_and_top_p_filters():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_logits(lp, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(lp, -1, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(lp, -1, 0.5)).tolist() == [[True, False, False, False]]


def test_weight_update_rejections_leave_the_engine_stale(hf_models):
    eng = HFEngine(str(hf_models["gqa1_untied"]))
    name, p = next(iter(eng.params.items()))
    eng.begin_update("v1")
    with pytest.raises(EngineWeightError, match="no parameter named 'bogus.weight'"):
        eng.update_bucket([("bogus.weight", torch.zeros(3))])
    with pytest.raises(EngineWeightError, match=r"engine shape .* received \(1, 2\)"):
        eng.update_bucket([(name, torch.zeros(1, 2))])
    with pytest.raises(StaleEngineError):
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    eng.update_bucket([(name, torch.zeros_like(p))])
    with pytest.raises(EngineWeightError, match="did not cover"):
        eng.finish_update()
    assert eng.stale and not eng.health()
    eng.update_weights([[(n, q.detach().clone()) for n, q in eng.params.items()]], "v2")
    assert not eng.stale and eng.version == "v2" and torch.equal(p, torch.zeros_like(p))


# ----------------------------------------------------------------------------- SGLang contract


@pytest.fixture
def recorder():
    r = ServerDouble({"model.norm.weight": [1.0, 2.0, 3.0]})
    yield r
    r.close()


def _sglang(recorder, **kw) -> SGLangEngine:
    cfg = SGLangConfig(launch=False, server_urls=[recorder.url], router_url=recorder.url, startup_timeout_s=5, **kw)
    return SGLangEngine(cfg)


def test_contract_generate_score_register_memory_abort(recorder):
    eng = _sglang(recorder)
    outs = eng.generate([[1, 2, 3], [9]], SamplingParams(temperature=1.0, top_p=0.9, n=2, max_new_tokens=5, seed=7))
    assert [[c.output_ids for c in g] for g in outs] == [[[4, 5], [4, 5]], [[10, 11], [10, 11]]]
    assert outs[0][0].logprobs == [-1.25, -1.25] and outs[0][0].finish_reason == "stop"
    assert eng.score([[4, 5, 6]]) == [[-0.5, -0.5]]
    eng.release_memory()
    eng.resume_memory(["weights"])
    eng.abort()
    posted = [(m, p, b) for m, p, b in recorder.requests if p not in ("/health", "/health_generate")]
    for _, path, body in posted:
        check_contract(path, body)
    paths = [p for _, p, _ in posted]
    assert paths[0] == "/workers" and posted[0][2] == {"url": recorder.url}
    gens = [b for _, p, b in posted if p == "/generate" and b["sampling_params"].get("max_new_tokens")]
    assert sorted(len(b["input_ids"]) for b in gens) == [2, 2]  # one request per prompt, repeated n times
    assert all(b["sampling_params"]["n"] == 1 and b["return_logprob"] is True for b in gens)
    assert {"/release_memory_occupation", "/resume_memory_occupation", "/abort_request"} <= set(paths)
    rel = next(b for _, p, b in posted if p == "/release_memory_occupation")
    assert rel == {"tags": ["weights", "kv_cache", "cuda_graph"]}


def test_contract_retries_then_surfaces(recorder):
    eng = _sglang(recorder, max_retries=2)
    recorder.fail_generate = 2
    assert eng.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].output_ids == [2, 3]
    recorder.fail_generate = 3
    with pytest.raises(EngineError, match="failed 3 times"):
        eng.generate([[1]], SamplingParams(max_new_tokens=2))


def test_contract_samples_from_other_weights_are_rejected(recorder):
    eng = _sglang(recorder, max_retries=1)
    eng.begin_update("step-1")  # verified (nothing to read back), but the server never got step-1
    eng.finish_update()
    with pytest.raises(EngineError, match="sampled with weight version 'initial', expected 'step-1'"):
        eng.generate([[1]], SamplingParams(max_new_tokens=2))
    recorder.version = "step-1"
    assert eng.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].output_ids == [2, 3]


@pytest.mark.parametrize("delete_by", ["url", "id"])
def test_contract_unregister_by_url_or_by_listed_id(recorder, delete_by):
    router = RouterDouble(delete_by=delete_by)
    try:
        cfg = SGLangConfig(launch=False, server_urls=[recorder.url], router_url=router.url, startup_timeout_s=5)
        eng = SGLangEngine(cfg)
        assert router.workers == [recorder.url]
        eng._unregister(eng.servers[0])
        assert router.workers == [] and not eng.servers[0].registered
        deletes = [p for m, p, _ in router.requests if m == "DELETE"]
        assert len(deletes) == (1 if delete_by == "url" else 2)  # by URL first, then by the listed id
    finally:
        router.close()


def test_contract_generation_timeout_is_retried(recorder):
    eng = _sglang(recorder, max_retries=1, request_timeout_s=1.0)
    recorder.stall_generate = 3.0  # longer than the request timeout: the first try times out
    assert eng.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].output_ids == [2, 3]
    assert sum(p == "/generate" for _, p, _ in recorder.requests) == 2


def test_contract_weight_verification(recorder):
    eng = _sglang(recorder)
    eng.begin_update("step-1")
    eng._verify.append(("model.norm.weight", torch.tensor([1.0, 2.0, 3.0])))
    eng.finish_update()
    assert eng.version == "step-1" and not eng.stale
    eng.begin_update("step-2")
    eng._verify.append(("model.norm.weight", torch.tensor([1.0, 2.5, 3.0])))
    with pytest.raises(EngineWeightError, match="does not match"):
        eng.finish_update()
    assert eng.stale
    with pytest.raises(StaleEngineError):
        eng.generate([[1]], SamplingParams(max_new_tokens=2))
    req = [b for _, p, b in recorder.requests if p == "/get_weights_by_name"]
    for b in req:
        check_contract("/get_weights_by_name", b)


@dataclass
class _Meta:  # same fields as sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def test_contract_update_from_tensor_payload_layout():
    bucket = [("a.weight", torch.randn(3, 4)), ("b.weight", torch.randn(5)), ("c.weight", torch.randn(2, 2).half())]
    subs = api.split_by_dtype(bucket)
    assert [[n for n, _ in s] for s in subs] == [["a.weight", "b.weight"], ["c.weight"]]
    flat = api.flatten_bucket(subs[0], _Meta)
    payloads = [api.serialize_payload(flat) for _ in range(2)]  # one per engine TP rank
    body = api.update_from_tensor_request(payloads, "step-3")
    check_contract("/update_weights_from_tensor", body)
    assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is True
    obj = pickle.loads(base64.b64decode(body["serialized_named_tensors"][1]))
    assert set(obj) == {"flattened_tensor", "metadata"} and obj["flattened_tensor"].dim() == 1
    for m, (n, t) in zip(obj["metadata"], subs[0]):  # SGLang's reconstruction: slice + reshape
        assert m.name == n and m.numel == t.numel() and m.dtype == t.dtype
        assert torch.equal(obj["flattened_tensor"][m.start_idx : m.end_idx].reshape(m.shape), t)
    with pytest.raises(ValueError, match="one dtype"):
        api.flatten_bucket(bucket, _Meta)


def test_contract_distributed_and_group_requests():
    bucket = [("x", torch.zeros(2, 3, dtype=torch.bfloat16)), ("y", torch.zeros(4))]
    body = api.update_from_distributed_request(bucket, "g", "step-4")
    check_contract("/update_weights_from_distributed", body)
    assert body["dtypes"] == ["bfloat16", "float32"] and body["shapes"] == [[2, 3], [4]]
    check_contract("/init_weights_update_group", api.init_group_request("h", 29650, 1, 3, "g"))
    with pytest.raises(ValueError, match="unknown memory tags"):
        api.memory_request(["weights", "kv"])


def test_launch_commands():
    cfg = SGLangConfig(model_path="/m", replicas=2, tp_size=2, port=31000)
    cmd = server_command(cfg, 1)
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "--enable-memory-saver" in cmd
    assert cmd[cmd.index("--base-gpu-id") + 1] == "2" and cmd[cmd.index("--port") + 1] == "31001"
    assert "sglang_router.launch_router" in router_command(cfg)
    with pytest.raises(Exception, match="model_path"):
        SGLangConfig().check_launchable()


# ------------------------------------------------------- SGLang supervision (processes, contract)


@pytest.fixture
def launched(tmp_path, monkeypatch):
    """An SGLangEngine that launches two server doubles and a router double as processes
    (``python -m sglang.launch_server`` resolves to tests/sglang_double_pkgs) and syncs over a
    gloo weight-update group: the engine's real supervision and distributed-sync code paths."""
    for k, v in process_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    base = free_port_block(5)  # 2 servers, router, 2 group generations
    cfg = SGLangConfig(
        model_path="unused-by-the-double",
        mode="distributed",
        weight_sync_backend="gloo",
        replicas=2,
        port=base,
        router_port=base + 2,
        nccl_master_address="127.0.0.1",
        nccl_master_port=base + 3,
        log_dir=str(tmp_path / "logs"),
        startup_timeout_s=120,
        weight_group_timeout_s=120,
    )
    eng = SGLangEngine(cfg)
    yield eng, tmp_path, base
    eng.shutdown()


def _bucket(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.norm.weight", torch.randn(8, generator=g)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(6, 4, generator=g).bfloat16()),
        ("model.layers.0.input_layernorm.weight", torch.randn(8, generator=g)),
    ]


def _holds(url: str, bucket) -> bool:
    """The server's copy of every tensor in ``bucket`` is bit-identical to ours."""
    for name, t in bucket:
        got = api.call(url + "/get_weights_by_name", api.weights_by_name_request(name, t.shape[0]), method="GET")
        if got is None or not torch.equal(torch.tensor(got).to(t.dtype), t):
            return False
    return True


def _log(tmp_path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def test_contract_dead_server_restarted_regrouped_and_resynced(launched):
    eng, logs, base = launched
    params = SamplingParams(max_new_tokens=2, n=2)
    b1 = _bucket(1)
    eng.update_weights([b1[:2], b1[2:]], "step-1")
    assert all(_holds(s.url, b1) for s in eng.servers)
    assert [g[0].output_ids for g in eng.generate([[1], [5]], params)] == [[2, 3], [6, 7]]

    # a server dies: requests routed to it fail, it is restarted and kept out of the router
    dead = eng.servers[1]
    old_pid = dead.proc.pid
    os.killpg(old_pid, signal.SIGKILL)
    dead.proc.wait()
    outs = eng.generate([[10 * i] for i in range(1, 5)], params)  # round robin: half go to the dead one
    assert [g[0].output_ids for g in outs] == [[11, 12], [21, 22], [31, 32], [41, 42]]
    assert dead.proc.pid != old_pid and dead.alive()
    assert dead.stale and not dead.registered and not dead.in_group and not eng.stale

    # the next sync tears the old group down, builds generation 2 with the new process, resyncs
    b2 = _bucket(2)
    eng.update_weights([b2], "step-2")
    assert all(_holds(s.url, b2) for s in eng.servers)
    assert all(s.registered and s.in_group and not s.stale for s in eng.servers) and eng.version == "step-2"
    eng.generate([[i] for i in range(4)], params)

    survivor = [(r["path"], r["body"]) for r in _log(logs, f"server_{base}") if "group" in r["path"]]
    assert [(p, b["group_name"]) for p, b in survivor] == [
        ("/init_weights_update_group", "megatron_klear_sync_1"),
        ("/destroy_weights_update_group", "megatron_klear_sync_1"),
        ("/init_weights_update_group", "megatron_klear_sync_2"),
    ]
    assert [b["master_port"] for p, b in survivor if p.startswith("/init")] == [base + 3, base + 4]
    restarted = [r for r in _log(logs, f"server_{base + 1}") if r["pid"] == dead.proc.pid]
    paths = [r["path"] for r in restarted]
    joined = next(r["body"] for r in restarted if r["path"] == "/init_weights_update_group")
    assert (joined["rank_offset"], joined["world_size"], joined["backend"]) == (2, 3, "gloo")
    # the restarted server generated nothing before it held the synced weights
    assert "/generate" in paths and paths.index("/update_weights_from_distributed") < paths.index("/generate")

    # the router dies: it is restarted and the in-sync servers are registered again
    old_router = eng._router_proc.pid
    os.killpg(old_router, signal.SIGKILL)
    eng._router_proc.wait()
    assert [g[0].output_ids for g in eng.generate([[7]], params)] == [[8, 9]]
    new_router = [r for r in _log(logs, f"router_{base + 2}") if r["pid"] == eng._router_proc.pid]
    assert eng._router_proc.pid != old_router
    assert sorted(r["body"]["url"] for r in new_router if r["path"] == "/workers") == [s.url for s in eng.servers]


def test_sync_broken_off_rebuilds_the_group(launched):
    eng, logs, base = launched
    eng.update_weights([_bucket(1)], "step-1")
    eng.begin_update("step-2")  # a sync that never finishes (say the trainer hit an error)
    b3 = _bucket(3)
    eng.update_weights([b3], "step-3")
    assert all(_holds(s.url, b3) for s in eng.servers) and eng.version == "step-3"
    groups = [
        r["body"]["group_name"] for r in _log(logs, f"server_{base}") if r["path"] == "/init_weights_update_group"
    ]
    assert groups == ["megatron_klear_sync_1", "megatron_klear_sync_2"]


def test_every_server_dead_means_stale_until_a_full_sync(launched):
    eng, logs, base = launched
    eng.update_weights([_bucket(1)], "step-1")
    for s in eng.servers:
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
    with pytest.raises(StaleEngineError, match="no in-sync SGLang server"):
        eng.generate([[1]], SamplingParams(max_new_tokens=2))
    assert eng.stale and all(s.alive() and s.stale and not s.registered for s in eng.servers)
    with pytest.raises(StaleEngineError):  # nothing is served from the restarted servers' initial weights
        eng.generate([[1]], SamplingParams(max_new_tokens=2))
    b2 = _bucket(2)
    eng.update_weights([b2], "step-2")  # what the RL loop does on StaleEngineError
    assert all(_holds(s.url, b2) and s.registered for s in eng.servers) and not eng.stale
    assert [g[0].output_ids for g in eng.generate([[1], [2]], SamplingParams(max_new_tokens=2))] == [[2, 3], [3, 4]]
