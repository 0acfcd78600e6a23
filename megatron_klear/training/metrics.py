"""Run observability: metrics.jsonl, a console line, TensorBoard, Weights & Biases, progress bar.

Only global rank 0 writes. W&B follows its own environment (``WANDB_MODE``, ``WANDB_API_KEY``,
``wandb login``) and runs offline only when none of them is set, so nothing needs a network
by default. A resumed run's TensorBoard drops the events of the steps it re-runs. The
metrics are listed, with their verl / slime names, in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from megatron_klear.distributed import is_main
from megatron_klear.errors import ConfigError


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        *,
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        run_name: Optional[str] = None,
        config: Optional[dict] = None,
        desc: str = "train",
    ):
        self.main = is_main()
        self.file = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not self.main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard is on but the tensorboard package is missing") from e
            # purge_step: events of the steps a resume re-runs are dropped, as in metrics.jsonl
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("log.wandb_project is set but wandb is not installed (pip install wandb)") from e
            self.wandb = wandb.init(
                project=wandb_project, name=run_name, config=config, mode=wandb_mode(), dir=str(output_dir)
            )
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        """Record one step's metrics everywhere (rank 0 only)."""
        if not self.main:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        self.file.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if console:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            line = f"[step {step}] {shown}"
            if self.bar is not None and not self.bar.disable:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


def wandb_mode() -> str | None:
    """The W&B mode to ask for: None (W&B decides) when ``WANDB_MODE``, an API key or a
    ``wandb login`` (its netrc entry) is set, else "offline"."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_flops(hf, doc_lengths: Iterable[int]) -> float:
    """Model FLOPs of training (forward + backward = 3x forward) on one packed sequence whose
    documents have these real lengths (padding excluded: it is not part of any document).

    Per real token: the dense matmuls of every layer (QKV, output projection, SwiGLU MLP; in a
    Qwen3-MoE layer the router and the top-k experts the token is routed to, not the others)
    and the LM head, 2 FLOPs per multiply-add. Attention works within each document (THD packing
    or the block-diagonal mask): causally, a document of d tokens has d^2 / 2 query-key pairs,
    each costing 2 x (heads x head_dim) multiply-adds (QK^T and PV), i.e. 2 x q_dim x d^2 FLOPs
    per layer.
    """
    h, L, hd = hf.hidden_size, hf.num_hidden_layers, hf.head_dim
    q, kv = hf.num_attention_heads * hd, hf.num_key_value_heads * hd
    attention_proj = 2 * h * (q + 2 * kv) + 2 * q * h
    per_token = sum(attention_proj + mlp_flops_per_token(hf, i) for i in range(L)) + 2 * h * hf.vocab_size
    lengths = [int(d) for d in doc_lengths]
    attention = L * 2 * q * sum(d * d for d in lengths)
    return 3 * (sum(lengths) * per_token + attention)


def mlp_flops_per_token(hf, layer: int) -> int:
    """Forward FLOPs of one token through layer ``layer``'s MLP: SwiGLU, or router + top-k experts."""
    h = hf.hidden_size
    if not getattr(hf, "is_sparse", lambda _: False)(layer):
        return 2 * 3 * h * hf.intermediate_size
    moe = hf.moe
    return 2 * h * moe.num_experts + moe.num_experts_per_tok * 2 * 3 * h * moe.moe_intermediate_size
