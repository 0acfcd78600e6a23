"""Run observability: metrics.jsonl, a console line, TensorBoard, Weights & Biases, progress bar.

Only global rank 0 writes. Every step's full metrics go to ``metrics.jsonl`` (and TensorBoard,
W&B); the console line is short: ``[step 12/400] loss=... lr=... | 0.21 s/step, ETA 1.4 min``
with the keys of ``CONSOLE_KEYS`` that the step has, the step count and the time left, also
outside a terminal (log files, Slurm output), where no progress bar is drawn.

W&B follows its own environment (``WANDB_MODE``, ``WANDB_API_KEY``, ``wandb login``) and runs
offline only when none of them is set, so nothing needs a network by default. The run's W&B id is
kept in ``output_dir/wandb_id`` and every start of the run (a restart, a Slurm requeue) resumes
that W&B run (``resume="allow"``) instead of starting a new one. A resumed run's TensorBoard drops
the events of the steps it re-runs. The metrics are listed, with their verl / slime names, in
docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from megatron_klear.console import duration
from megatron_klear.distributed import is_main
from megatron_klear.errors import ConfigError

# What a console step line shows when the step has it (SFT, RL, evaluation); the rest is in
# metrics.jsonl. "eval/avg@" and "eval/pass@" match any k.
CONSOLE_KEYS = (
    "loss", "val_loss", "grad_norm", "lr", "tokens_per_s_per_device", "mfu",
    "reward/mean", "reward/accuracy", "response/length_mean", "rollout/groups_kept", "loss/pg",
    "rollout/logprob_diff", "eval/avg@", "eval/pass@",
)  # fmt: skip
_SHORT = {"tokens_per_s_per_device": "tok/s/dev", "response/length_mean": "resp_len", "rollout/groups_kept": "kept",
          "rollout/logprob_diff": "probe_diff"}  # fmt: skip
WANDB_ID_FILE = "wandb_id"


@dataclass
class WandbSettings:
    """Where a run logs in Weights & Biases (the ``log.wandb_*`` keys)."""

    project: str
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


def console_line(step: int, total: int, metrics: dict, seconds_per_step: Optional[float]) -> str:
    """The short console line of a step (module doc)."""
    shown = []
    for key in CONSOLE_KEYS:
        for k in [k for k in metrics if k == key or (key.endswith("@") and k.startswith(key))]:
            shown.append(f"{_SHORT.get(k, k)}={_fmt(metrics[k])}")
    line = f"[step {step}/{total}] " + " ".join(shown)
    if seconds_per_step is not None:
        line += f" | {seconds_per_step:.3g} s/step, ETA {duration(seconds_per_step * max(total - step, 0))}"
    return line


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of the run in ``output_dir``: the one kept there, or a new one, kept."""
    path = output_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        *,
        tensorboard: bool = True,
        wandb: Optional[WandbSettings] = None,
        run_name: Optional[str] = None,
        config: Optional[dict] = None,
        desc: str = "train",
    ):
        self.main = is_main()
        self.file = None
        self.tb = None
        self.wandb = None
        self.bar = None
        self.total, self.start_step, self.started = total_steps, start_step, time.time()
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
        if wandb is not None:
            self.wandb = start_wandb(wandb, output_dir, run_name, config)
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
        """Record one step's metrics everywhere (rank 0 only); the console gets the short line."""
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
            done = step - self.start_step
            rate = (time.time() - self.started) / done if done > 0 else None
            line = console_line(step, self.total, metrics, rate)
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


def start_wandb(settings: WandbSettings, output_dir: Path, name: Optional[str], config: Optional[dict]):
    """``wandb.init`` of the run in ``output_dir``: the same W&B run on every start (its id kept
    there, ``resume="allow"``), offline unless W&B is configured (``wandb_mode``)."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("log.wandb_project is set but wandb is not installed (pip install wandb)") from e
    return wandb.init(
        project=settings.project,
        entity=settings.entity,
        group=settings.group,
        tags=list(settings.tags) or None,
        name=name,
        config=config,
        id=wandb_run_id(output_dir),
        resume="allow",
        mode=wandb_mode(),
        dir=str(output_dir),
    )


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
