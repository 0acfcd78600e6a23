"""Vocab-parallel log-probs / entropy: torch reference and Triton kernel vs float64."""

from __future__ import annotations

import pytest
import torch

from megatron_klear.distributed import spawn
from megatron_klear.ops.logprobs import vocab_parallel_logprobs
from megatron_klear.ops.loss import policy_loss
from tests.dist_workers import logprobs_tp_worker
from tests.references import reference_f64

IMPLS = ["torch", "triton"]


def run(impl, logits, targets, temperature, g_logp, g_ent):
    x = logits.detach().clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(x, targets, temperature=temperature, with_entropy=True, impl=impl)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    assert x.grad.dtype == logits.dtype
    return logp, ent, x.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "tokens,vocab,dtype,scale,temperature",
    [
        (7, 1000, torch.float32, 3.0, 1.0),  # vocab not a power of two
        (5, 5000, torch.float32, 3.0, 0.6),  # several blocks, last one partial
        (6, 777, torch.bfloat16, 5.0, 1.0),  # bf16 logits
        (4, 300, torch.float32, 1e4, 1.0),  # extreme logits
    ],
)
def test_matches_float64(impl, tokens, vocab, dtype, scale, temperature):
    g = torch.Generator().manual_seed(tokens * vocab)
    logits = (torch.randn(tokens, vocab, generator=g) * scale).to(dtype)
    if scale > 100:
        logits[0, :] = -1e4
        logits[0, 3] = 1e4  # one-hot row
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    g_logp, g_ent = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)
    lp, ent, grad = run(impl, logits, targets, temperature, g_logp, g_ent)
    rlp, rent, rgrad = reference_f64(logits, targets, temperature, g_logp.double(), g_ent.double())
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()
    atol = 2e-5 * max(1.0, scale / temperature)
    assert torch.allclose(lp.double(), rlp, atol=atol, rtol=1e-5)
    assert torch.allclose(ent.double(), rent, atol=atol, rtol=1e-5)
    gtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(grad.double(), rgrad, atol=gtol, rtol=gtol)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprob_only_backward_and_empty_input(impl):
    logits = torch.randn(3, 50, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    lp, ent = vocab_parallel_logprobs(logits, t, impl=impl)
    assert ent is None
    lp.sum().backward()
    ref = torch.softmax(logits.detach(), -1)
    expected = -ref
    expected[torch.arange(3), t] += 1
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    empty, _ = vocab_parallel_logprobs(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long), impl=impl)
    assert empty.shape == (0,)


def test_bad_inputs_are_named():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="impl"):
        vocab_parallel_logprobs(x, torch.zeros(3, dtype=torch.long), impl="cuda")
    with pytest.raises(ValueError, match="targets must be a tensor of shape"):
        vocab_parallel_logprobs(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must lie in"):
        vocab_parallel_logprobs(x, torch.full((3,), 10))
    with pytest.raises(ValueError, match="logits must be float32"):
        vocab_parallel_logprobs(x.double(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(x, torch.zeros(3, dtype=torch.long), temperature=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_tp2_equals_tp1_through_the_gppo_loss(impl, tmp_path):
    """Logits split over 2 gloo ranks give TP=1's log-probs, entropy and d loss / d logits."""
    g = torch.Generator().manual_seed(11)
    b, t, v = 3, 4, 600
    case = dict(
        logits=(torch.randn(b * t, v, generator=g) * 2).to(torch.bfloat16),
        targets=torch.randint(0, v - 37, (b * t,), generator=g),
        temperature=0.8,
        shape=(b, t),
        old=-torch.rand(b, t, generator=g) * 4 - 3,
        adv=torch.randn(b, 1, generator=g),
        mask=(torch.rand(b, t, generator=g) > 0.2).float(),
        vocab_size=v - 37,  # the last 37 columns (on rank 1) are vocabulary padding
    )
    path = str(tmp_path / "case.pt")
    torch.save(case, path)
    spawn(logprobs_tp_worker, 2, impl, path)
    out = torch.load(path + f".{impl}.out")
    x = case["logits"].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(
        x, case["targets"], temperature=0.8, with_entropy=True, impl=impl, vocab_size=case["vocab_size"]
    )
    loss, _ = policy_loss(lp.view(b, t), case["old"], case["adv"], case["mask"])
    (loss - 0.01 * ent.mean()).backward()
    assert torch.allclose(out["logp"], lp, atol=1e-5) and torch.allclose(out["ent"], ent, atol=1e-5)
    assert torch.allclose(out["grad"].float(), x.grad.float(), atol=1e-4)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_padding_is_not_part_of_the_distribution(impl):
    """Megatron pads the vocabulary; padded columns must get no probability and no gradient."""
    g = torch.Generator().manual_seed(5)
    real, padded = 300, 384
    logits = torch.randn(6, padded, generator=g) * 2
    logits[:, real:] = 5.0  # whatever the padded rows of the output layer produce
    targets = torch.randint(0, real, (6,), generator=g)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, with_entropy=True, impl=impl, vocab_size=real)
    (lp.sum() + ent.sum()).backward()
    rlp, rent, rgrad = reference_f64(
        logits[:, :real], targets, 1.0, torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    )
    assert torch.allclose(lp.double(), rlp, atol=1e-5) and torch.allclose(ent.double(), rent, atol=1e-5)
    assert torch.allclose(x.grad[:, :real].double(), rgrad, atol=1e-5)
    assert (x.grad[:, real:] == 0).all()
    with pytest.raises(ValueError, match="targets must lie in"):
        vocab_parallel_logprobs(x, torch.full((6,), real), vocab_size=real)
