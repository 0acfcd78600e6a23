"""What tests/e2e/test_transformers_range.py runs in a Python whose transformers is one end of the
declared range (``python -W error::DeprecationWarning -W error::FutureWarning -m
tests.hf_range_worker OUT``): every path of ours that touches transformers, with that version.

1. the tiny model written (``make_tiny_model``), converted to Megatron and exported back;
2. the export loaded by transformers (model, tokenizer, generation config) with the source's logits;
3. the HF engine on the export: greedy = transformers' ``generate``, sampled log-probs = the
   model's at the temperature before top-p truncation, a seed fixes the samples, stop ids stop;
   and on the Megatron checkpoint (config only), filled by a weight update.

Deprecation warnings are errors (the interpreter's ``-W``); transformers' own deprecation notices
go through its logger (``warning_once``), so they are collected here and fail the run too.
Prints one JSON line: the transformers version and what was checked.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from megatron_klear.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_klear.inference.base import SamplingParams
from megatron_klear.inference.hf import HFEngine
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model

PROMPTS = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 7, 100, 200, 31, 12]]


class Deprecations(logging.Handler):
    """Every record of the transformers logger that announces a deprecation or a removal."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "deprecat" in text.lower() or "will be removed" in text.lower():
            self.messages.append(text)


def check_export(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    hf_to_megatron(str(src), str(out / "mg"))
    megatron_to_hf(str(out / "mg"), str(out / "hf"), sampling={"temperature": 0.6, "top_p": 0.95})
    ids = torch.tensor([PROMPTS[2]])
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits), "the export's logits differ from its source's"
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    gen = GenerationConfig.from_pretrained(str(out / "hf"))
    assert gen.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>") and gen.temperature == 0.6


def check_engine(export: Path, megatron_dir: Path) -> None:
    engine = HFEngine(str(export))
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    for prompt, [c] in zip(PROMPTS, greedy):
        ref = engine.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert c.output_ids == ref[: len(c.output_ids)], (c.output_ids, ref)
    p = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, n=2, seed=123)
    outs = engine.generate(PROMPTS, p)
    for prompt, group in zip(PROMPTS, outs):
        for c in group:
            full = engine.score([prompt + c.output_ids], temperature=0.7)[0][len(prompt) - 1 :]
            assert torch.allclose(torch.tensor(full), torch.tensor(c.logprobs), atol=1e-5), "log-probs"
    samples = [[c.output_ids for c in g] for g in outs]
    assert samples == [[c.output_ids for c in g] for g in engine.generate(PROMPTS, p)], "a seed fixes the samples"
    other = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, n=2, seed=124)
    assert samples != [[c.output_ids for c in g] for g in engine.generate(PROMPTS, other)]
    first = greedy[0][0].output_ids[0]
    [[s]] = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[first]))
    assert s.output_ids == [first] and s.finish_reason == "stop"
    empty = HFEngine(str(megatron_dir), dtype="float32")  # a Megatron checkpoint: config only
    empty.update_weights([[(n, t.detach().clone()) for n, t in engine.params.items()]], "v1")
    synced = empty.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [[(c.output_ids, c.logprobs) for c in g] for g in synced] == [
        [(c.output_ids, c.logprobs) for c in g] for g in greedy
    ]  # the same samples; each completion carries its engine's weight version ("v1" here)
    assert {c.weight_version for g in synced for c in g} == {"v1"}


def main(out: Path) -> None:
    import transformers

    deprecations = Deprecations()
    logging.getLogger("transformers").addHandler(deprecations)
    src = make_tiny_model(out / "src", TinyModelArgs(heads=8, kv_heads=2, head_dim=8, seed=2))
    check_export(src, out)
    check_engine(out / "hf", out / "mg")
    assert not deprecations.messages, f"transformers announced deprecations: {deprecations.messages}"
    print(json.dumps({"transformers": transformers.__version__, "checked": ["export", "engine"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
