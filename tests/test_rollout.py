"""Rollout engines: the HF engine's sampling and weight updates, and the SGLang request contract.

The SGLang tests are CONTRACT TESTS: SGLang cannot run on CPU, so a local HTTP server records
what our SGLangEngine sends and answers in SGLang 0.5.x's response format. They check that every
request has exactly the fields and JSON types of SGLang's request structs
(``srt/managers/io_struct.py``); they say nothing about SGLang's behaviour.
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_klear.rollout import sglang_api as api
from megatron_klear.rollout.base import EngineError, EngineWeightError, SamplingParams, StaleEngineError
from megatron_klear.rollout.hf_engine import HFEngine, filter_logits
from megatron_klear.rollout.sglang_engine import SGLangConfig, SGLangEngine, router_command, server_command

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

# Request fields and JSON types, transcribed from SGLang 0.5.x io_struct.py / sampling_params.py.
INT_LIST = ("list", "int")
SCHEMA = {
    "/generate": {"input_ids": list, "sampling_params": dict, "return_logprob": bool, "logprob_start_len": int},
    "/workers": {"url": str},
    "/update_weights_from_tensor": {
        "serialized_named_tensors": list,
        "load_format": (str, type(None)),
        "flush_cache": bool,
        "weight_version": str,
    },
    "/update_weights_from_distributed": {
        "names": list,
        "dtypes": list,
        "shapes": list,
        "group_name": str,
        "flush_cache": bool,
        "weight_version": str,
    },
    "/init_weights_update_group": {
        "master_address": str,
        "master_port": int,
        "rank_offset": int,
        "world_size": int,
        "group_name": str,
        "backend": str,
    },
    "/release_memory_occupation": {"tags": list},
    "/resume_memory_occupation": {"tags": list},
    "/abort_request": {"abort_all": bool},
    "/get_weights_by_name": {"name": str, "truncate_size": int},
}
SAMPLING = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_new_tokens": int,
    "n": int,
    "stop_token_ids": list,
    "skip_special_tokens": bool,
    "no_stop_trim": bool,
    "sampling_seed": int,
}


def check_contract(path: str, body: dict) -> None:
    fields = SCHEMA[path]
    extra = set(body) - set(fields)
    assert not extra, f"{path}: fields SGLang does not know: {extra}"
    for k, v in body.items():
        assert isinstance(v, fields[k]) and not (fields[k] is int and isinstance(v, bool)), (path, k, v)
    if path == "/generate":
        assert all(isinstance(t, int) for row in body["input_ids"] for t in row)
        for k, v in body["sampling_params"].items():
            assert k in SAMPLING and isinstance(v, SAMPLING[k]), (k, v)


class Recorder:
    """Local HTTP test double that records requests and answers like SGLang / sglang_router."""

    def __init__(self, weights: dict):
        self.requests: list[tuple[str, str, dict]] = []
        self.weights = weights  # name -> list returned by /get_weights_by_name
        self.fail_generate = 0
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else {}
                rec.requests.append((method, self.path, body))
                self._reply(*rec.answer(self.path, body))

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict):
        if path in ("/health", "/health_generate", "/workers", "/abort_request"):
            return 200, {}
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, {}
        if path == "/get_weights_by_name":
            return 200, self.weights.get(body["name"])
        if path == "/generate":
            if self.fail_generate:
                self.fail_generate -= 1
                return 503, {"error": "worker unavailable"}
            out = []
            for ids in body["input_ids"]:
                if body["sampling_params"]["max_new_tokens"] == 0:  # scoring
                    lps = [[None, ids[0], None]] + [[-0.5, t, None] for t in ids[1:]]
                    out.append(
                        {
                            "output_ids": [],
                            "meta_info": {"input_token_logprobs": lps, "finish_reason": {"type": "length"}},
                        }
                    )
                else:
                    toks = [ids[-1] + 1, ids[-1] + 2]
                    meta = {
                        "finish_reason": {"type": "stop", "matched": toks[-1]},
                        "completion_tokens": 2,
                        "weight_version": "v",
                        "output_token_logprobs": [[-1.25, t, None] for t in toks],
                    }
                    out.append({"output_ids": toks, "meta_info": meta})
            return 200, out
        return 404, {"error": path}

    def close(self):
        self.server.shutdown()


@pytest.fixture
def recorder():
    r = Recorder({"model.norm.weight": [1.0, 2.0, 3.0]})
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
        SGLangConfig().validate()
