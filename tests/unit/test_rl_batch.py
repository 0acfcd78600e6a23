"""RL pieces without a training job: group advantages, mini-batch layouts (padded and packed)
and normalisers, config errors that name the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_klear.config import load_config
from megatron_klear.errors import ConfigError
from megatron_klear.rl.batch import minibatches
from megatron_klear.rl.config import AlgoConfig, RLConfig
from megatron_klear.rl.loss import ratio_baseline
from megatron_klear.rl.rollout import Sample, group_advantages, has_signal, score_groups
from tests.jobs import ROOT

CONFIG = "examples/tiny/rl_math.yaml"


def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert abs(sum(adv)) < 1e-12 and adv[0] == pytest.approx(1.0, abs=1e-5)
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]  # eps-safe, no NaN
    ref = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    expect = (ref - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
    assert torch.allclose(torch.tensor(group_advantages(ref.tolist()), dtype=torch.float64), expect)


def test_group_advantages_sample_std_is_the_public_codes():
    ref = torch.tensor([0.2, 0.5, 1.0, -1.0], dtype=torch.float64)
    expect = (ref - ref.mean()) / (torch.std(ref) + 1e-6)  # torch.std: n - 1
    got = torch.tensor(group_advantages(ref.tolist(), 1e-6, "sample"), dtype=torch.float64)
    assert torch.allclose(got, expect)
    assert not torch.allclose(got, torch.tensor(group_advantages(ref.tolist()), dtype=torch.float64))
    assert group_advantages([1.0, 1.0], std="sample") == [0.0, 0.0]


def test_filter_metric_score_or_acc():
    wrong_formats = [_sample(1, 1, 0.0, False, reward=r) for r in (-1.0, -0.5, -1.0, -2.0)]
    assert has_signal(wrong_formats, "score") and not has_signal(wrong_formats, "acc")
    mixed = [_sample(1, 1, 0.0, c) for c in (True, False)]
    assert has_signal(mixed, "score") and has_signal(mixed, "acc")
    same = [_sample(1, 1, 0.0, True) for _ in range(3)]
    assert not has_signal(same, "score") and not has_signal(same, "acc")


def test_stale_rows_take_the_engine_logprobs_as_old_unless_tis():
    """Kept surplus groups (data.surplus=keep) were sampled before the previous step's updates:
    their ratio is against the engine's log-probs of that policy, not a recomputation."""
    fresh, kept = _sample(2, 2, 1.0, True), _sample(2, 2, -1.0, False)
    fresh.weight_version, kept.weight_version = 3, 2  # trained at policy version 3: the second is stale
    [mini] = minibatches([[fresh, kept]], 1, dp=1, dp_rank=0, mbs=2, policy_version=3)
    [mb] = mini.micro
    response = mb.loss_mask > 0
    assert mb.stale()[response].tolist() == [False, False, True, True] and not mb.stale()[~response].any()
    mb.old_lp = torch.where(response, mb.engine_lp - 1.0, torch.zeros(()))  # the trainer's recomputation
    mb.validate()
    trainer = ratio_baseline(AlgoConfig(), mb, torch.float64)
    assert trainer.dtype == torch.float64
    assert trainer[0].tolist() == mb.old_lp[0].tolist() and trainer[1].tolist() == mb.engine_lp[1].tolist()
    assert torch.equal(ratio_baseline(AlgoConfig(old_logprobs="engine"), mb, torch.float32), mb.engine_lp)
    assert torch.equal(ratio_baseline(AlgoConfig(tis_cap=2.0), mb, torch.float32), mb.old_lp)


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
    assert len(rows) == 4 and sum(int(m.loss_mask.sum()) for m in rows) == 13  # every response token once
    first = rows[0]  # prompt 1 2 3, response 50..53: positions 2..5 predict the response tokens
    assert first.loss_mask[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert first.cu_seqlens is None  # a plain row: causal attention, no mask built here
    assert first.labels[0, 2:6].tolist() == [50, 51, 52, 53]
    assert torch.allclose(first.engine_lp[0, 2:6], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert first.versions[0].tolist() == [-1, -1, 0, 0, 0, 0, -1, -1]  # shifted like the log-probs
    for mb in rows:
        mb.validate()
    # a mini-batch of 3 sequences at dp=2 gains one empty sequence, not a loss token
    odd = minibatches([groups[0] + [_sample(2, 2, 0.0, False)]], 1, dp=2, dp_rank=1, mbs=1)[0]
    assert odd.num_seqs == 3 and sum(int(m.loss_mask.sum()) for m in odd.micro) == 2


def test_packed_layout_balances_ranks_and_keeps_every_field_with_its_tokens():
    g = torch.Generator().manual_seed(3)
    lengths = [
        (int(torch.randint(2, 9, (), generator=g)), int(torch.randint(1, 40, (), generator=g))) for _ in range(14)
    ]
    groups = [[_sample(p, r, 0.1 * k - 0.5, k % 3 == 0) for k, (p, r) in enumerate(lengths[i : i + 7])] for i in (0, 7)]
    seqs = [s for grp in groups for s in grp]
    budget, dp = 64, 2
    minis = [minibatches(groups, 2, dp=dp, dp_rank=r, max_tokens=budget)[0] for r in range(dp)]
    padded = minibatches(groups, 2, dp=dp, dp_rank=0, mbs=2)[0]

    def normalisers(m):
        return m.num_tokens, m.num_seqs, m.correct_tokens

    # the normalisers come from the whole mini-batch, not from the layout
    assert normalisers(minis[0]) == normalisers(minis[1]) == normalisers(padded)
    assert len(minis[0].micro) == len(minis[1].micro) == minis[0].layout.micro_batches  # Megatron's schedule
    placed = sorted(i for m in minis for i in m.placement)
    assert placed == list(range(len(seqs)))  # every sequence on exactly one rank
    rank_tokens = minis[0].layout.rank_tokens
    assert sum(rank_tokens) == sum(p + r for p, r in lengths)
    assert max(rank_tokens) - min(rank_tokens) <= max(p + r for p, r in lengths)  # longest-first balance
    fill = sum(rank_tokens) / sum(mb.input_ids.numel() for m in minis for mb in m.micro)
    assert minis[0].layout.fill == pytest.approx(fill) and fill > 0.85
    for m in minis:
        used = [0] * len(m.micro)
        for i, (k, _, _) in m.placement.items():
            used[k] += len(seqs[i].prompt_ids) + len(seqs[i].response_ids)
        assert max(used) <= budget  # sequence tokens within the budget
        for mb, n in zip(m.micro, used):
            assert mb.shape == (1, -(-n // 8) * 8)
            mb.validate()
        for i, (k, row, a) in m.placement.items():
            s, mb = seqs[i], m.micro[k]
            p, r = len(s.prompt_ids), len(s.response_ids)
            n = p + r
            assert mb.input_ids[row, a : a + n].tolist() == s.prompt_ids + s.response_ids
            assert mb.position_ids[row, a : a + n].tolist() == list(range(n))  # restart per sequence
            assert int(a) in mb.cu_seqlens[row].tolist() and int(a + n) in mb.cu_seqlens[row].tolist()
            assert mb.labels[row, a + p - 1 : a + n - 1].tolist() == s.response_ids
            assert int(mb.labels[row, a + n - 1]) == 0  # the last token predicts nothing across the boundary
            loss = mb.loss_mask[row, a : a + n]
            assert loss.nonzero().flatten().tolist() == list(range(p - 1, n - 1))
            assert torch.allclose(mb.engine_lp[row, a + p - 1 : a + n - 1], torch.tensor(s.engine_logprobs))
            assert mb.versions[row, a : a + n].tolist() == [-1] * (p - 1) + [0] * r + [-1]
            assert torch.all(mb.adv[row, a : a + n] == torch.tensor(s.advantage, dtype=torch.float32))
            assert torch.all(mb.correct[row, a : a + n] == float(s.correct))
            ids = mb.seq_ids[row, a : a + n]
            assert torch.all(ids == ids[0]) and int((mb.seq_ids == ids[0]).sum()) == n  # its own sequence id


def test_budget_edges_long_sequences_empty_micro_batches_and_the_context():
    # Two 30-token sequences (longer than the budget of 16: a micro-batch each) and a 6-token one.
    # Rank 0 holds a long one and the short one in two micro-batches; rank 1 holds the other long
    # one and so gets an empty micro-batch as its second, to run the same schedule.
    groups = [[_sample(5, 25, 1.0, True), _sample(10, 20, -1.0, False), _sample(2, 4, 0.0, False)]]
    minis = [minibatches(groups, 1, dp=2, dp_rank=r, max_tokens=16)[0] for r in range(2)]
    assert [len(m.micro) for m in minis] == [2, 2]
    assert minis[0].placement == {0: (0, 0, 0), 2: (1, 0, 0)} and minis[1].placement == {1: (0, 0, 0)}
    assert [mb.shape[1] for m in minis for mb in m.micro] == [32, 8, 32, 8]
    empty = minis[1].micro[1]
    assert not empty.loss_mask.any() and empty.cu_seqlens[0].tolist() == [0, 8]
    empty.validate()
    with pytest.raises(ConfigError, match="30 tokens .* exceeds the model's context max_position_embeddings=24"):
        minibatches(groups, 1, dp=1, dp_rank=0, max_tokens=64, max_seq_len=24)


@pytest.mark.parametrize("packed", [True, False])
def test_typed_micro_batch_validate_names_the_broken_field(packed):
    """The shape contract of RLMicroBatch (and of MicroBatch under it): every way a field can
    lose its token (a one-token offset, a wrong shape, a value outside its sequence) is named."""
    import dataclasses

    groups = [[_sample(3, 4, 0.5, True), _sample(2, 6, -0.5, False), _sample(4, 2, 0.0, False)]]
    layout = dict(max_tokens=64) if packed else dict(mbs=3)
    [mb] = minibatches(groups, 1, dp=1, dp_rank=0, policy_version=2, **layout)[0].micro
    mb.validate()
    trained = mb.loss_mask > 0

    def broken(**changes):
        return dataclasses.replace(mb, **changes)

    cases = [
        (broken(labels=torch.roll(mb.labels, 1, 1)), "labels: are not input_ids shifted by one"),
        (broken(loss_mask=torch.roll(mb.loss_mask, 1, 1)), "loss_mask: trains a document's last position"),
        (broken(engine_lp=torch.roll(mb.engine_lp, 1, 1)), "engine_lp"),  # off by one token
        (broken(adv=mb.adv[:, :-1]), "adv: must be a"),
        (broken(correct=mb.correct.long()), "correct: has dtype torch.int64"),
        (broken(versions=torch.where(trained, 3, -1)), r"versions: of trained tokens must lie in \[0, policy"),
        (broken(versions=torch.zeros_like(mb.versions)), "versions: must be -1 where no sampled token"),
        (broken(adv=mb.adv + torch.arange(mb.shape[1]) * 1e-3), "adv: is not constant within a sequence"),
        (broken(old_lp=torch.where(trained, float("nan"), 0.0)), "old_lp: must be finite log-probs"),
        (broken(position_ids=mb.position_ids + 1), "position_ids: must start every row at 0"),
    ]
    if packed:
        cases.append((broken(seq_ids=torch.zeros_like(mb.seq_ids)), "seq_ids: of row 0 do not number its"))
        cases.append((broken(cu_seqlens=[mb.cu_seqlens[0][:-1]]), "cu_seqlens: .* must rise from 0 to"))
    for bad, match in cases:
        with pytest.raises(AssertionError, match=f"micro-batch field {match}"):
            bad.validate()


def test_block_diagonal_mask_never_crosses_a_document():
    from megatron_klear.training.batches import MicroBatch, attention_inputs

    def zeros(b):
        return torch.zeros(b, 8, dtype=torch.long)

    cu = np.array([0, 3, 5, 8], np.int32)
    mb = MicroBatch(zeros(1), zeros(1), zeros(1), zeros(1).float(), cu_seqlens=[cu])
    blocked = attention_inputs(mb, use_te=False, device="cpu", causal_masks={})["attention_mask"][0, 0]
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(~blocked, allowed)
    plain, cache = MicroBatch(zeros(2), zeros(2), zeros(2), zeros(2).float()), {}
    first = attention_inputs(plain, use_te=False, device="cpu", causal_masks=cache)["attention_mask"]
    assert attention_inputs(plain, use_te=False, device="cpu", causal_masks=cache)["attention_mask"] is first
    assert len(cache) == 1 and first.shape == (1, 1, 8, 8)  # one mask per length, shared
    assert attention_inputs(plain, use_te=True, device="cpu", causal_masks={}) == {"attention_mask": None}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="data.max_tokens_per_micro_batch=100 is smaller than the longest sequence"):
        load_config(RLConfig, ROOT / CONFIG, ["data.max_tokens_per_micro_batch=100"])
    with pytest.raises(ConfigError, match="data.max_tokens_per_micro_batch must be >= 1"):
        load_config(RLConfig, ROOT / CONFIG, ["data.max_tokens_per_micro_batch=0"])
    with pytest.raises(ConfigError, match="prompts_per_step=6 is not a multiple of data.mini_batch_prompts=4"):
        load_config(RLConfig, ROOT / CONFIG, ["data.prompts_per_step=6"])
    with pytest.raises(ConfigError, match="algo.loss"):
        load_config(RLConfig, ROOT / CONFIG, ["algo.loss=ppo"])
    with pytest.raises(ConfigError, match="n_samples"):
        load_config(RLConfig, ROOT / CONFIG, ["rollout.n_samples=1"])
    for key, bad in (
        ("data.surplus", "buffer"),
        ("algo.filter_metric", "reward"),
        ("algo.adv_std", "unbiased"),
        ("data.gen_batch_prompts", "0"),
        ("optim.beta2", "1.0"),
        ("optim.eps", "0"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(RLConfig, ROOT / CONFIG, [f"{key}={bad}"])


def _collector(hf_models, surplus: str):
    """A Collector on the tiny HF model: no filtering and twice as many prompts generated as a
    step takes, so every step has a surplus of 2 groups."""
    from transformers import AutoTokenizer

    from megatron_klear.data.rl import CurationConfig, load_rl_prompts
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.rl.rollout import Collector, PromptStream

    model = hf_models["gqa4_untied"]
    data = ROOT / "examples" / "data"
    cfg = load_config(RLConfig, ROOT / CONFIG, [
        f"model.hf={model}", "bootstrap=null", "data.generate=null", f"data.train=[{data / 'math_train.parquet'}]",
        "data.prompts_per_step=2", "data.mini_batch_prompts=2", "data.gen_batch_prompts=4",
        "data.max_gen_batches=1", f"data.surplus={surplus}", "rollout.n_samples=2", "rollout.max_response_len=3",
        "algo.filter_zero_adv=false",
    ])  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(model))
    prompts, _ = load_rl_prompts(cfg.data.train, CurationConfig(min_code_tests=0, dedup=False))
    stream = PromptStream(prompts, tok, cfg.data.seed, cfg.rollout.max_prompt_len)
    return Collector(HFEngine(str(model)), tok, stream, cfg)


@pytest.mark.parametrize("surplus", ["discard", "keep"])
def test_surplus_groups_discarded_by_default_or_kept_as_stale(hf_models, surplus):
    col = _collector(hf_models, surplus)
    groups, m, pos, rest = col.collect(1, (0, 0), [])
    assert len(groups) == 2 and m["rollout/groups_generated"] == 4 and pos == (0, 4)
    assert all(s.weight_version == 0 for g in groups for s in g)  # sampled by the weights of step 0
    if surplus == "discard":
        assert rest == [] and m["rollout/groups_discarded"] == 2 and m["rollout/groups_buffered"] == 0
        # a buffer from an older checkpoint is not trained on either
        again, m2, _, _ = col.collect(2, pos, groups)
        assert m2["rollout/groups_stale"] == 0 and not {g[0].uid for g in again} & {g[0].uid for g in groups}
        return
    assert len(rest) == 2 and m["rollout/groups_buffered"] == 2 and m["rollout/groups_discarded"] == 0
    assert all(s.weight_version == 0 for g in rest for s in g)
    nxt, m2, _, _ = col.collect(2, pos, rest)
    assert nxt[:2] == rest and m2["rollout/groups_stale"] == 2  # trained first, older than the policy
    mb = minibatches(nxt, 2, dp=1, dp_rank=0, mbs=4, policy_version=1)[0].micro[0]
    response = mb.loss_mask > 0  # four rows of one sequence each; staleness travels per token
    assert mb.stale().shape == mb.shape and response.sum(-1).min() > 0
    assert mb.stale()[response].all() and not mb.stale()[~response].any()
    mb.validate()


def _sample(p: int, r: int, adv: float, correct: bool, reward: float | None = None) -> Sample:
    reward = (1.0 if correct else 0.0) if reward is None else reward
    return Sample("u", list(range(1, p + 1)), list(range(50, 50 + r)), [-0.1 * (i + 1) for i in range(r)], "stop",
                  reward, correct, "", adv)  # fmt: skip


def test_evaluation_reports_strict_and_lenient_math_scores(hf_models):
    """Strict = the run's reward (think block, boxed answer, not truncated); lenient = the public
    judge_math.py (math-verify on the whole response). Same samples, both scorings."""
    from transformers import AutoTokenizer

    from megatron_klear.data.rl import RLPrompt
    from megatron_klear.inference.base import Completion
    from megatron_klear.inference.hf import HFEngine
    from megatron_klear.rl.config import RewardConfig
    from megatron_klear.rl.evaluate import evaluate, lenient_math

    tok = AutoTokenizer.from_pretrained(str(hf_models["gqa4_untied"]))
    texts = [
        ("<think>3 + 4</think> \\boxed{7}", "stop"),  # strict and lenient
        ("so 3 + 4 = 7", "stop"),  # no think block: lenient only
        ("<think>3 + 4</think> \\boxed{7}", "length"),  # cut at the length limit: lenient only
        ("<think>3 + 4</think> \\boxed{8}", "stop"),  # wrong for both
    ]
    comps = [[Completion(tok.encode(t), [0.0] * len(tok.encode(t)), f) for t, f in texts]]
    math = RLPrompt("m", "test", "math", [{"role": "user", "content": "3 + 4?"}], "7")
    code = RLPrompt("c", "test", "code", [{"role": "user", "content": "print 1"}], "[]")
    rewards = RewardConfig()
    assert lenient_math(tok, [code, math], [[], comps[0]], rewards, workers=2) == {1: [True, True, True, False]}
    assert [r.correct for r in score_groups(tok, [math], comps, rewards, 2)[0]] == [True, False, False, False]

    m = evaluate(HFEngine(str(hf_models["gqa4_untied"])), tok, [math], rewards, workers=2, k=2, max_new_tokens=4)
    assert {"eval/avg@2", "eval/math/avg@2", "eval/math/lenient_avg@2", "eval/math/lenient_pass@2"} <= set(m)
    off = evaluate(HFEngine(str(hf_models["gqa4_untied"])), tok, [math], rewards, k=2, max_new_tokens=4,
                   lenient_scores=False)  # fmt: skip
    assert "eval/math/lenient_avg@2" not in off
