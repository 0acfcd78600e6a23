"""Independent references the tests compare against (HF transformers' own Qwen3)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits.float()
