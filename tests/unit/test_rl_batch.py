"""RL pieces without a training job: group advantages, mini-batch layout and normalisers,
config errors that name the field."""

from __future__ import annotations

import pytest
import torch

from megatron_klear.config import load_config
from megatron_klear.errors import ConfigError
from megatron_klear.rl.batch import minibatches
from megatron_klear.rl.config import RLConfig
from megatron_klear.rl.rollout import Sample, group_advantages
from tests.jobs import ROOT

CONFIG = "examples/tiny/rl_math.yaml"


def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert abs(sum(adv)) < 1e-12 and adv[0] == pytest.approx(1.0, abs=1e-5)
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # eps-safe, no NaN
    ref = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    expect = (ref - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
    assert torch.allclose(torch.tensor(group_advantages(ref.tolist()), dtype=torch.float64), expect)


def test_minibatches_normalisers_masks_and_dp_split():
    groups = [
        [_sample(3, 4, 0.5, True), _sample(2, 6, -0.5, False)],
        [_sample(5, 1, 1.0, True), _sample(4, 2, -1.0, False)],
    ]
    minis = [minibatches(groups, 2, dp=2, dp_rank=r, mbs=1) for r in range(2)]
    for r in range(2):
        [mb] = minis[r]
        assert (mb.num_tokens, mb.num_seqs, mb.correct_tokens) == (13, 4, 5)
    rows = [m for r in range(2) for m in minis[r][0].micro]
    assert len(rows) == 4 and sum(int(m["mask"].sum()) for m in rows) == 13  # every response token once
    first = rows[0]  # prompt 1 2 3, response 50..53: positions 2..5 predict the response tokens
    assert first["mask"][0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert first["labels"][0, 2:6].tolist() == [50, 51, 52, 53]
    assert torch.allclose(first["engine_lp"][0, 2:6], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    # a mini-batch of 3 sequences at dp=2 gains one empty sequence, not a loss token
    odd = minibatches([groups[0] + [_sample(2, 2, 0.0, False)]], 1, dp=2, dp_rank=1, mbs=1)[0]
    assert odd.num_seqs == 3 and sum(int(m["mask"].sum()) for m in odd.micro) == 2


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="prompts_per_step=6 is not a multiple of data.mini_batch_prompts=4"):
        load_config(RLConfig, ROOT / CONFIG, ["data.prompts_per_step=6"])
    with pytest.raises(ConfigError, match="algo.loss"):
        load_config(RLConfig, ROOT / CONFIG, ["algo.loss=ppo"])
    with pytest.raises(ConfigError, match="n_samples"):
        load_config(RLConfig, ROOT / CONFIG, ["rollout.n_samples=1"])


def _sample(p: int, r: int, adv: float, correct: bool) -> Sample:
    return Sample("u", list(range(1, p + 1)), list(range(50, 50 + r)), [-0.1 * (i + 1) for i in range(r)], "stop",
                  1.0 if correct else 0.0, correct, "", adv)  # fmt: skip
