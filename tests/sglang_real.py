"""Running the real SGLang (0.5.23) server and sglang-router (0.3.2) on CPU in the tests.

``bash tools/test.sh`` installs them into ``.venv-sglang`` (tools/setup_env.sh) and exports
``KLEAR_SGLANG_PYTHON``. Servers start with SGLang's CPU engine and the stand-in packages of
tests/sglang_standins on their PYTHONPATH (and only theirs). A missing install fails the tests:
they must never skip in CI.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from megatron_klear.distributed import free_port
from megatron_klear.inference.sglang_servers import SGLangConfig

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT / "tests" / "sglang_standins"
STARTUP_S = 300.0  # server start to /health: 20-80 s measured on the 2-core machines


def sglang_python() -> str:
    """The SGLang venv's Python; fails the calling test when it is not installed."""
    py = os.environ.get("KLEAR_SGLANG_PYTHON") or str(ROOT / ".venv-sglang" / "bin" / "python")
    if not Path(py).is_file():
        pytest.fail(f"no SGLang install at {py}: run the tests through `bash tools/test.sh` (it installs it)")
    return py


def server_env() -> dict[str, str]:
    """What a CPU SGLang server needs in its environment."""
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(STANDINS)}


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports that are free on 127.0.0.1 right now."""
    for base in random.Random().sample(range(20000, 60000, 7), 50):
        if all(free_port(p) == p for p in range(base, base + n)):
            return base
    raise RuntimeError("no block of free ports")


def cpu_engine_config(model: Path, log_dir: Path, replicas: int = 1, **fields) -> SGLangConfig:
    """An SGLangConfig that launches ``replicas`` real CPU servers (float32, like the trainer
    and the HF reference) and a router on free ports, syncing over a gloo group."""
    base = free_port_block(replicas + 1 + 8)  # servers, router, group generations
    values = dict(
        model_path=str(model),
        mode="distributed",
        weight_sync_backend="gloo",
        device="cpu",
        dtype="float32",
        python=sglang_python(),
        env=server_env(),
        extra_args=["--skip-server-warmup", "--max-total-tokens", "4096"],
        replicas=replicas,
        port=base,
        router_port=base + replicas,
        nccl_master_address="127.0.0.1",
        nccl_master_port=base + replicas + 1,
        log_dir=str(log_dir),
        startup_timeout_s=STARTUP_S,
        weight_group_timeout_s=120.0,
        register_timeout_s=60.0,
        max_retries=2,
    )
    values.update(fields)
    return SGLangConfig(**values)


def cli_overrides(cfg: SGLangConfig) -> list[str]:
    """``rollout.sglang.*`` overrides for a trainer that launches servers like ``cfg``."""
    return [
        f"rollout.sglang.mode={cfg.mode}",
        f"rollout.sglang.weight_sync_backend={cfg.weight_sync_backend}",
        f"rollout.sglang.device={cfg.device}",
        f"rollout.sglang.dtype={cfg.dtype}",
        f"rollout.sglang.python={cfg.python}",
        f"rollout.sglang.env={json.dumps(cfg.env)}",  # JSON is YAML: every value stays a string
        f"rollout.sglang.extra_args={json.dumps(cfg.extra_args)}",
        f"rollout.sglang.port={cfg.port}",
        f"rollout.sglang.router_port={cfg.router_port}",
        f"rollout.sglang.nccl_master_address={cfg.nccl_master_address}",
        f"rollout.sglang.nccl_master_port={cfg.nccl_master_port}",
        f"rollout.sglang.startup_timeout_s={cfg.startup_timeout_s}",
    ]
