"""Packed RL micro-batches on a real Megatron model (gloo ranks): the same per-token log-probs,
loss and gradients as padded micro-batches, whatever the token budget and the DP size, at TP=1
and at TP=2 x PP=2 (where packs of different lengths cross the pipeline)."""

from __future__ import annotations

import pytest
import torch

from megatron_klear.distributed import spawn
from tests.dist_workers import rl_layout_worker

TOKEN_MEAN = {
    "padded": dict(mbs=2),
    "packed_whole": dict(max_tokens=4096),  # each rank's sequences in one micro-batch
    "packed_tight": dict(max_tokens=56),  # the longest sequence is 54 tokens: many packs
}
SEQ_MEAN = {  # sequence-mean aggregation: packed rows hold several sequences
    "padded_seq_mean": dict(mbs=3, agg="seq-mean-token-mean"),
    "packed_seq_mean": dict(max_tokens=56, agg="seq-mean-token-mean"),
}
REPORTED = ("pg_sum", "tokens", "seqs", "entropy", "sft_nll", "correct_tokens", "engine_diff", "ppo_kl")


@pytest.fixture(scope="module")
def tp1_runs(hf_models, tmp_path_factory) -> dict[int, list[dict]]:
    """Every case at DP=1 and at DP=2 (TP=1, PP=1): world size -> per-rank results."""
    root = tmp_path_factory.mktemp("rl_pack")
    runs = {}
    for world in (1, 2):
        out = str(root / f"world{world}")
        spawn(rl_layout_worker, world, 1, 1, str(hf_models["gqa4_untied"]), {**TOKEN_MEAN, **SEQ_MEAN}, out)
        runs[world] = [torch.load(f"{out}.{r}") for r in range(world)]
    return runs


def logprobs(ranks: list[dict], case: str) -> dict[int, torch.Tensor]:
    """Every sequence's response log-probs, from whichever rank held it."""
    merged: dict[int, torch.Tensor] = {}
    for r in ranks:
        for i, lp in r[case]["logp"].items():
            assert i not in merged or torch.equal(merged[i], lp)  # TP ranks of the last stage agree
            merged[i] = lp
    return merged


def assert_same(got: dict, ref: dict, what: str) -> None:
    for k in REPORTED:
        assert got["report"][k] == pytest.approx(ref["report"][k], rel=1e-5, abs=1e-6), f"{what}: {k}"
    assert got["grads"].keys() == ref["grads"].keys()
    for n, g in got["grads"].items():
        assert g.abs().max() > 0 or ref["grads"][n].abs().max() == 0, f"{what}: {n} has no gradient"
        torch.testing.assert_close(g, ref["grads"][n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{what}: {n}: {m}")


def assert_same_logprobs(got: dict[int, torch.Tensor], ref: dict[int, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(ref) == list(range(12)), what
    for i in ref:
        torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: sequence {i}: {m}")


def test_packed_equals_padded_whatever_the_budget_and_dp(tp1_runs):
    for cases in (TOKEN_MEAN, SEQ_MEAN):
        reference = next(iter(cases))  # padded at DP=1
        ref = tp1_runs[1][0][reference]
        ref_logp = logprobs(tp1_runs[1], reference)
        assert ref["report"]["tokens"] == sum(len(lp) for lp in ref_logp.values())
        for world, ranks in tp1_runs.items():
            for case in cases:
                what = f"{case} at DP={world}"
                assert_same_logprobs(logprobs(ranks, case), ref_logp, what)
                for r in ranks:  # TP=1: every DP rank holds every parameter
                    assert_same(r[case], ref, f"{what}, rank {r}")
    # the layouts really differ: one pack per rank, or several packs of different lengths
    whole, tight = (tp1_runs[2][0][c]["shapes"] for c in ("packed_whole", "packed_tight"))
    assert len(whole) == 1 and len(tight) > 2 and len(set(tight)) > 1
    assert all(shape[0] == 1 and shape[1] <= 56 for shape in tight)


def test_packed_equals_padded_tp2_pp2(hf_models, tmp_path):
    cases = {"padded": TOKEN_MEAN["padded"], "packed_tight": TOKEN_MEAN["packed_tight"]}
    out = str(tmp_path / "tp2pp2")
    spawn(rl_layout_worker, 4, 2, 2, str(hf_models["gqa4_untied"]), cases, out)
    ranks = [torch.load(f"{out}.{r}") for r in range(4)]
    assert len(set(ranks[0]["packed_tight"]["shapes"])) > 1  # packs of several lengths crossed the pipeline
    assert_same_logprobs(logprobs(ranks, "packed_tight"), logprobs(ranks, "padded"), "TP2 x PP2")
    for r, result in enumerate(ranks):  # each rank's shard of the parameters
        assert_same(result["packed_tight"], result["padded"], f"TP2 x PP2 rank {r}")
