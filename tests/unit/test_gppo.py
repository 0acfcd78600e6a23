"""GPPO / clip / CISPO losses and the vocab-parallel log-prob kernels against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_klear.ops.loss import policy_loss, sft_on_correct_loss

EPS_L, EPS_H, C = 0.2, 0.28, 10.0


def paper_loss_f64(logp, old, A, mask, algo, eps_l=EPS_L, eps_h=EPS_H, c=C, beta1=1.0, beta2=1.0):
    """Literal transcription of gppo.md (max / clamp form with stop-gradients), float64."""
    delta = torch.exp(logp - old)
    sg = delta.detach()
    if algo == "gppo":
        lo_b = beta1 * (1 - eps_l) / sg * delta
        hi_b = beta2 * (1 + eps_h) / sg * delta
        l1 = -A * delta
        l2 = -A * torch.maximum(torch.minimum(delta, hi_b), lo_b)  # clamp(delta, lo_b, hi_b)
        lt = torch.maximum(l1, l2)
        lt = torch.where(A < 0, torch.minimum(lt, -A * c), lt)
    elif algo == "clip":
        lt = torch.maximum(-A * delta, -A * delta.clamp(1 - eps_l, 1 + eps_h))
        lt = torch.where(A < 0, torch.minimum(lt, -A * c), lt)
    else:
        lt = -A * sg.clamp(1 - eps_l, 1 + eps_h) * logp
    return (lt * mask).sum() / mask.sum()


def make_batch(b=6, t=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    logp = old + torch.randn(b, t, generator=g, dtype=dtype) * 0.5  # ratios on every side of the clips
    A = torch.randn(b, 1, generator=g, dtype=dtype)
    mask = (torch.rand(b, t, generator=g) > 0.2).to(dtype)
    mask[0] = 0  # a row with no response tokens
    return logp, old, A, mask


@pytest.mark.parametrize("algo", ["gppo", "clip", "cispo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_matches_paper_reference(algo, dtype):
    logp, old, A, mask = make_batch()
    ours_in = logp.to(dtype).clone().requires_grad_()
    loss, metrics = policy_loss(ours_in, old.to(dtype), A.to(dtype), mask.to(dtype), algo=algo)
    loss.backward()
    ref_in = logp.clone().requires_grad_()
    ref = paper_loss_f64(ref_in, old, A, mask, algo)
    ref.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - ref.item()) < tol * max(1, abs(ref.item()))
    assert torch.allclose(ours_in.grad.double(), ref_in.grad, atol=tol, rtol=tol)
    assert metrics["clipfrac_high"] > 0 and metrics["clipfrac_low"] > 0


@pytest.mark.parametrize("beta1,beta2", [(1.0, 1.0), (0.5, 2.0)])
def test_gppo_gradient_is_minus_A_times_F_in_every_branch(beta1, beta2):
    """Eq. 12 (general form Eq. 17/18): d l / d logp = -A F, one token per branch."""
    lo, hi = 1 - EPS_L, 1 + EPS_H
    cases = [  # (A, ratio, F)
        (1.0, 0.5, 0.5),  # A>0, below 1-eps_l: PPO keeps it, F = delta
        (1.0, 1.1, 1.1),  # A>0, inside
        (1.0, 2.0, beta2 * hi),  # A>0, above 1+eps_h: PPO gives 0, GPPO (1+eps_h)
        (-1.0, 0.5, beta1 * lo),  # A<0, below 1-eps_l: PPO gives 0, GPPO (1-eps_l)
        (-1.0, 1.1, 1.1),  # A<0, inside
        (-1.0, 3.0, 3.0),  # A<0, above 1+eps_h but below c: unclipped
        (-1.0, 12.0, 0.0),  # A<0, above the dual-clip constant
        (0.0, 2.0, 0.0),  # no signal
    ]
    A = torch.tensor([[a] for a, _, _ in cases], dtype=torch.float64)
    old = torch.full((len(cases), 1), -1.0, dtype=torch.float64)
    logp = (old + torch.tensor([[math.log(r)] for _, r, _ in cases], dtype=torch.float64)).requires_grad_()
    mask = torch.ones_like(old)
    loss, _ = policy_loss(logp, old, A, mask, beta1=beta1, beta2=beta2)
    loss.backward()
    expected = torch.tensor([-a * f for a, _, f in cases], dtype=torch.float64) / len(cases)
    assert torch.allclose(logp.grad.squeeze(1), expected, atol=1e-12)
    # and PPO (clip) has zero gradient exactly where GPPO keeps one
    logp2 = logp.detach().clone().requires_grad_()
    policy_loss(logp2, old, A, mask, algo="clip")[0].backward()
    assert logp2.grad[2].item() == 0 and logp2.grad[3].item() == 0 and logp2.grad[6].item() == 0
    assert logp2.grad[1].item() != 0


@pytest.mark.parametrize("algo", ["gppo", "clip", "cispo"])
def test_extreme_log_ratios_keep_the_unclamped_gradient(algo):
    """At log r = +-25 (past the +-20 clamp that keeps exp finite) value and gradient equal the
    unclamped float64 formula: GPPO's clipped branches keep -A (1 + eps_h) / -A (1 - eps_l), the
    dual clip stays 0. The one branch that depends on delta itself (A > 0, log r = -25) gets
    exp(-20) instead of exp(-25), a difference of ~2e-9."""
    cases = [(1.0, 25.0), (-1.0, 25.0), (-1.0, -25.0), (1.0, -25.0), (2.0, 25.0), (-0.5, -25.0)]
    A = torch.tensor([[a] for a, _ in cases], dtype=torch.float64)
    old = torch.full((len(cases), 1), -30.0, dtype=torch.float64)
    start = old + torch.tensor([[lr] for _, lr in cases], dtype=torch.float64)
    mask = torch.ones_like(old)
    ours = start.clone().requires_grad_()
    loss, _ = policy_loss(ours, old, A, mask, algo=algo)
    loss.backward()
    ref_in = start.clone().requires_grad_()
    ref = paper_loss_f64(ref_in, old, A, mask, algo)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-8
    assert torch.allclose(ours.grad, ref_in.grad, rtol=0, atol=1e-8), (ours.grad, ref_in.grad)
    if algo == "gppo":  # the preserved gradients are there (a plain clamp made them 0)
        assert ours.grad[0].item() == pytest.approx(-(1 + EPS_H) / len(cases), abs=1e-12)
        assert ours.grad[2].item() == pytest.approx((1 - EPS_L) / len(cases), abs=1e-12)


def test_gppo_value_equals_clip_higher_ppo():
    logp, old, A, mask = make_batch(seed=3)
    a, _ = policy_loss(logp, old, A, mask, algo="gppo")
    b, _ = policy_loss(logp, old, A, mask, algo="clip")
    assert abs(a.item() - b.item()) < 1e-12


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_gradient_invariant_to_micro_batch_split(agg, splits):
    logp, old, A, mask = make_batch(b=8, seed=5)
    full_in = logp.clone().requires_grad_()
    full, _ = policy_loss(full_in, old, A, mask, agg=agg)
    full.backward()
    n_tok = mask.sum().item()
    n_seq = (mask.sum(-1) > 0).sum().item()
    parts_in = logp.clone().requires_grad_()
    total = 0.0
    for idx in torch.arange(8).chunk(splits):
        loss, _ = policy_loss(parts_in[idx], old[idx], A[idx], mask[idx], agg=agg, num_tokens=n_tok, num_seqs=n_seq)
        loss.backward()
        total += loss.item()
    assert abs(total - full.item()) < 1e-12
    assert torch.allclose(parts_in.grad, full_in.grad, atol=1e-14)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_packed_rows_aggregate_like_one_row_per_sequence(agg):
    """Rows 1-3 and 4-6 of a batch packed into two rows (seq_ids tell the sequences apart):
    the same loss and the same per-token gradient as one row per sequence."""
    logp, old, A, mask = make_batch(b=6, seed=7)
    rows_in = logp.clone().requires_grad_()
    ref, _ = policy_loss(rows_in, old, A, mask, agg=agg)
    ref.backward()

    def pack(t):  # [6, 9] -> [2, 27]
        return t.reshape(2, 27)

    ids = pack(torch.arange(6)[:, None].expand(6, 9).contiguous())
    packed_in = pack(logp).clone().requires_grad_()
    adv = pack(A.expand(6, 9).contiguous())
    got, _ = policy_loss(packed_in, pack(old), adv, pack(mask), agg=agg, seq_ids=ids)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(packed_in.grad.reshape(6, 9), rows_in.grad, atol=1e-15)


def test_aggregations_by_hand():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    A = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)  # per-token loss = -A (ratio 1)
    tm, _ = policy_loss(logp, old, A, mask, agg="token-mean")
    smtm, _ = policy_loss(logp, old, A, mask, agg="seq-mean-token-mean")
    smts, _ = policy_loss(logp, old, A, mask, agg="seq-mean-token-sum")
    assert tm.item() == pytest.approx(-(1 + 1 + 2) / 3)
    assert smtm.item() == pytest.approx(-(1 + 2) / 2)
    assert smts.item() == pytest.approx(-(2 + 2) / 2)


def test_masked_tokens_carry_no_value_or_gradient_even_if_garbage():
    logp, old, A, mask = make_batch(seed=7)
    garbage = logp.clone()
    garbage[mask == 0] = float("-inf")
    g_in = garbage.clone().requires_grad_()
    loss, _ = policy_loss(g_in, old, A, mask)
    loss.backward()
    ref_in = logp.clone().requires_grad_()
    ref, _ = policy_loss(ref_in, old, A, mask)
    ref.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), abs=1e-14)
    assert torch.equal(g_in.grad, ref_in.grad) and (g_in.grad[mask == 0] == 0).all()


def test_all_masked_batch_gives_zero_loss():
    logp, old, A, _ = make_batch()
    loss, m = policy_loss(logp.requires_grad_(), old, A, torch.zeros_like(old))
    assert loss.item() == 0.0 and m["clipfrac_high"] == 0.0


def test_sft_on_correct_loss():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    correct = torch.tensor([True, False])
    loss = sft_on_correct_loss(logp, mask, correct)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5, 0], [0, 0, 0]], dtype=torch.float64))
    assert sft_on_correct_loss(logp, mask, torch.tensor([False, False])).item() == 0.0
    assert sft_on_correct_loss(logp, mask, correct, num_tokens=4).item() == pytest.approx(
        -(math.log(0.5) + math.log(0.25)) / 4
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(algo="ppo"), "algo"),
        (dict(agg="mean"), "agg"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(nan_policy="ignore"), "nan_policy"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    logp, old, A, mask = make_batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, A, mask, **kwargs)


def test_bad_shapes_and_dtypes_are_named():
    logp, old, A, mask = make_batch()
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(logp, old[:, :3], A, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(logp, old, A[:3], mask)
    with pytest.raises(ValueError, match="old_logprobs must be float32 or float64"):
        policy_loss(logp, old.half(), A, mask)
    with pytest.raises(ValueError, match="mask must be"):
        policy_loss(logp, old, A, mask[:, :2])


def test_non_finite_inputs_never_give_a_finite_loss():
    logp, old, A, mask = make_batch()
    bad = logp.clone()
    bad[1, 0], mask[1, 0] = float("nan"), 1
    with pytest.raises(ValueError, match="logprobs has 1 non-finite"):
        policy_loss(bad, old, A, mask)
    loss, m = policy_loss(bad, old, A, mask, nan_policy="report")
    assert not torch.isfinite(loss) and m["nonfinite"] == 1
    A2 = A.clone()
    A2[2] = float("inf")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, A2, mask)
