"""Runs that chain stages: RL whose starting model an earlier stage writes (``bootstrap``).

    python -m megatron_klear.rl --config examples/tiny/rl_math.yaml   (this module's ``rl_main``)

When ``model.hf`` of an RL config does not exist yet and ``bootstrap`` names another config (an
SFT run, or an earlier RL stage, told apart by its sections), that run goes first, in the same
processes, and must export ``model.hf``; its process groups are torn down before the RL run
builds its own. This module sits above ``sft`` and ``rl`` so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_klear.cli import DryRun, run_config_entry
from megatron_klear.config import load_config, read_yaml
from megatron_klear.distributed import destroy_distributed, is_main
from megatron_klear.errors import ConfigError
from megatron_klear.rl import trainer as rl
from megatron_klear.rl.config import RLConfig
from megatron_klear.sft import trainer as sft
from megatron_klear.sft.config import SFTConfig
from megatron_klear.training.run import preflight


def stage_config(path: str) -> RLConfig | SFTConfig:
    """The config of a stage file: RL when it has a ``rollout`` or ``algo`` section, else SFT."""
    raw = read_yaml(path)
    return load_config(RLConfig if "rollout" in raw or "algo" in raw else SFTConfig, path, [])


def bootstrap(cfg: RLConfig) -> None:
    """Run the stage ``bootstrap`` names first when ``model.hf`` does not exist yet."""
    if cfg.bootstrap is None or cfg.model.hf is None or (Path(cfg.model.hf) / "config.json").is_file():
        return
    first = stage_config(cfg.bootstrap)
    if is_main():
        print(f"{cfg.model.hf} is missing: running {cfg.bootstrap} first", flush=True)
    if isinstance(first, RLConfig):
        run_rl(first)
    else:
        sft.train(first)
    destroy_distributed()
    if not (Path(cfg.model.hf) / "config.json").is_file():
        raise ConfigError(f"bootstrap {cfg.bootstrap} ran but model.hf={cfg.model.hf} still does not exist")


def run_rl(cfg: RLConfig) -> dict:
    """RL after its bootstrap stage (if the model is missing); returns the last step's metrics."""
    preflight(cfg, cfg.data.train + cfg.data.eval, cfg.data.generate, model_will_exist=cfg.bootstrap is not None)
    bootstrap(cfg)
    return rl.train(cfg)


def rl_dry_run(cfg: RLConfig, report: DryRun) -> None:
    """``--dry-run`` of an RL run, and of its bootstrap stage's config when that runs first."""
    rl.dry_run(cfg, report)
    if cfg.bootstrap is not None and cfg.model.hf is not None and not (Path(cfg.model.hf) / "config.json").is_file():
        if report.check(stage_config, cfg.bootstrap) is not None:
            print(f"bootstrap {cfg.bootstrap}: config loads (it runs first: model.hf is not there yet)", flush=True)


def rl_main(argv: Optional[list[str]] = None) -> int:
    """``python -m megatron_klear.rl``: the command line (``cli.run_config_entry``)."""
    return run_config_entry(RLConfig, run_rl, rl.__doc__, argv, rl_dry_run, prog="python -m megatron_klear.rl")
