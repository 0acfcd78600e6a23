"""Long context on a REAL SGLang 0.5.23 server (CPU): a model whose config.json has plain RoPE,
served with ``rope_scaling`` (YaRN) and ``context_length`` as ``rollout.sglang`` and
``tools/eval.py --engine sglang`` pass them (``--json-model-override-args``,
``--context-length``), samples past the original context with transformers' YaRN log-probs,
and not with plain RoPE's."""

from __future__ import annotations

import pytest
import torch

from megatron_klear.inference.base import SamplingParams
from megatron_klear.inference.hf import HFEngine
from megatron_klear.inference.sglang import SGLangEngine
from megatron_klear.inference.sglang_servers import server_command
from megatron_klear.models.tiny import TinyModelArgs, make_tiny_model
from tests.sglang_real import cpu_engine_config

pytestmark = [pytest.mark.real_sglang, pytest.mark.timeout(900)]

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_sglang_serves_yarn_past_the_original_context(tmp_path):
    model = make_tiny_model(tmp_path / "plain", TinyModelArgs(max_positions=16, seed=9))
    cfg = cpu_engine_config(model, tmp_path / "logs", rope_scaling=YARN, context_length=64)
    cmd = server_command(cfg, 0)
    assert cmd[cmd.index("--context-length") + 1] == "64" and "--json-model-override-args" in cmd
    engine = SGLangEngine(cfg)
    try:
        prompt = list(range(40, 60))  # 20 tokens; the samples run to position 50, past 16
        params = SamplingParams(temperature=1.0, max_new_tokens=30, n=2, seed=5, ignore_eos=True)
        groups = engine.generate([prompt], params)
    finally:
        engine.shutdown()
    yarn, plain = HFEngine(str(model), rope_scaling=YARN), HFEngine(str(model))
    for c in groups[0]:
        assert len(c.output_ids) == 30
        theirs = torch.tensor(c.logprobs, dtype=torch.float64)
        seq = prompt + c.output_ids
        ref = torch.tensor(yarn.score([seq])[0][len(prompt) - 1 :], dtype=torch.float64)
        off = torch.tensor(plain.score([seq])[0][len(prompt) - 1 :], dtype=torch.float64)
        assert torch.allclose(theirs, ref, atol=2e-3), (theirs - ref).abs().max()
        assert (theirs - off).abs().max() > 0.05  # plain RoPE gives other log-probs: the check can fail
