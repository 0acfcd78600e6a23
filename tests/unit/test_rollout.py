"""Rollout engines: the HF engine's sampling and weight updates; the SGLang engine's payload
layout, requests and launch commands, and the colocated gather plan. The SGLang engine's
behaviour is tested against a real SGLang server in tests/e2e/test_sglang_real.py."""

from __future__ import annotations

import base64
import json
import pickle

import pytest
import torch

from megatron_klear.errors import ConfigError, EngineError, EngineWeightError, StaleEngineError
from megatron_klear.inference import sglang_api as api
from megatron_klear.inference.base import SamplingParams
from megatron_klear.inference.hf import HFEngine, filter_logits
from megatron_klear.inference.sglang_servers import SGLangConfig, router_command, server_command
from megatron_klear.sync import ipc
from megatron_klear.sync.colocated import assemble, my_slots, senders
from megatron_klear.sync.ipc import ColocatedTarget

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


# ----------------------------------------------------------------------------- SGLang requests
# (what SGLang does with them is tested against the real server: tests/e2e/test_sglang_real.py)


def test_flattened_bucket_is_sglangs_byte_layout_and_needs_no_sglang():
    bucket = [("a.weight", torch.randn(3, 5).half()), ("b.weight", torch.randn(5)), ("c.weight", torch.randn(2, 2))]
    ordered = api.bucket_order(bucket)
    assert [n for n, _ in ordered] == ["b.weight", "c.weight", "a.weight"]  # wide dtypes first: aligned
    flat, meta = api.flatten_bucket(ordered)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in bucket)
    obj = pickle.loads(base64.b64decode(ipc.serialize_payload(flat, meta)))
    for m, (n, t) in zip(obj["metadata"], ordered):  # FlattenedTensorBucket.reconstruct_tensors
        assert type(m).__module__ == "types" and m.name == n  # SimpleNamespace: in SGLang's allow-list
        got = obj["flattened_tensor"][m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)
        assert torch.equal(got, t) and m.start_idx % t.element_size() == 0
    with pytest.raises(ValueError, match="not a multiple"):
        api.flatten_bucket(bucket)  # half first leaves the float32 tensors unaligned
    ipc.share_cpu_tensors()
    found = ipc.payload_globals(ipc.serialize_payload(flat, meta))
    assert "types.SimpleNamespace" in found and all(n.startswith(ipc.PAYLOAD_GLOBAL_PREFIXES) for n in found)


def test_requests_carry_per_sample_seeds_and_sglang_field_names():
    p = SamplingParams(temperature=0.7, n=3, max_new_tokens=5, seed=100, ignore_eos=True)
    assert api.sample_seeds(p, 6, 3) == [106, 107, 108]
    assert api.sample_seeds(SamplingParams(), 0, 2) == [None, None]
    body = api.generate_request([1, 2], p, 107)
    assert body["input_ids"] == [1, 2] and body["sampling_params"]["sampling_seed"] == 107
    assert body["sampling_params"]["n"] == 1 and body["sampling_params"]["ignore_eos"] is True
    dist_body = api.update_from_distributed_request([("x", torch.zeros(2, 3, dtype=torch.bfloat16))], "g", "v")
    assert dist_body["dtypes"] == ["bfloat16"] and dist_body["load_format"] == "flattened_bucket"
    with pytest.raises(ValueError, match="unknown memory tags"):
        api.memory_request(["weights", "kv"])


def test_launch_commands():
    cfg = SGLangConfig(model_path="/m", replicas=2, tp_size=2, port=31000, python="")
    cmd = server_command(cfg, 1)
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "--enable-memory-saver" in cmd
    assert cmd[cmd.index("--base-gpu-id") + 1] == "2" and cmd[cmd.index("--port") + 1] == "31001"
    cpu = server_command(SGLangConfig(model_path="/m", device="cpu", python="/usr/bin/python3"), 0)
    assert cpu[0] == "/usr/bin/python3" and "--enable-memory-saver" not in cpu and "torch_native" in cpu
    router = router_command(cfg)
    assert {"--disable-health-check", "--disable-circuit-breaker"} <= set(router)
    assert router[router.index("--request-timeout-secs") + 1] == str(int(cfg.request_timeout_s))
    with pytest.raises(Exception, match="model_path"):
        SGLangConfig().check_launchable()
    with pytest.raises(Exception, match="rollout.sglang.python"):
        SGLangConfig(model_path="/m", python="/no/such/python").validate()


def test_colocated_payloads_are_gathered_to_each_servers_first_gpu():
    targets = [ColocatedTarget("http://a", [0, 1]), ColocatedTarget("http://b", [2, 3])]
    assert my_slots(targets, 1, True) == [(0, 1)] and my_slots(targets, 1, False) == []
    assert senders(targets, 0, True) == [0] and senders(targets, 2, True) == [1] and senders(targets, 1, True) == []
    gathered = [{(0, 0): "p00"}, {(0, 1): "p01"}, {(1, 0): "p10"}, {(1, 1): "p11"}]  # one dict per rank
    assert assemble(targets, gathered) == {0: ["p00", "p01"], 1: ["p10", "p11"]}
    with pytest.raises(EngineError, match=r"GPU \[3\] of http://b"):
        assemble(targets, gathered[:3])
