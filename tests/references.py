"""Independent references the tests compare against (HF transformers' own Qwen3, float64 torch)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits.float()


def reference_f64(logits, targets, temperature, g_logp, g_ent):
    """Float64 log-probs, entropy and d(sum g_logp logp + sum g_ent H)/d logits."""
    x = logits.double().detach().requires_grad_()
    logsm = torch.log_softmax(x / temperature, dim=-1)
    logp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, x.grad
